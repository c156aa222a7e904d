//! Process images: `image.meta` as read by `image::load` before a restore. The first input
//! byte picks the mode: the rest is the whole file, or (odd byte) the archived payload
//! behind a valid header and checksum so the fuzzer reaches the rkyv decoder and the
//! semantic checks. Every load ends in an `ImageError` or a validated image.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sha2::Digest;
use wisp_procmig::image::{self, META_FILE, META_HEADER, META_MAGIC, VERSION};

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut h = vec![0u8; META_HEADER];
        h[..8].copy_from_slice(META_MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&(rest.len() as u64).to_le_bytes());
        h[24..56].copy_from_slice(&sha2::Sha256::digest(rest));
        h.extend_from_slice(rest);
        h
    };
    let d = dir().path();
    std::fs::write(d.join(META_FILE), &file).expect("write image.meta");
    let _ = image::load(d);
});
