//! Registry commands: a sequence of postcard-encoded `Stamped` commands (any command a
//! client may send, at any time stamp) applied to one registry. `apply` must answer each
//! with a reply or a `RegistryError`, never panic (overflowing time arithmetic included),
//! and the state must still snapshot and restore.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wisp_naming::registry::{Registry, Stamped};
use wisp_naming::store::{decode_snapshot, encode_snapshot};

fuzz_target!(|data: &[u8]| {
    let mut reg = Registry::default();
    let mut rest = data;
    for _ in 0..64 {
        match postcard::take_from_bytes::<Stamped>(rest) {
            Ok((s, tail)) => {
                let _ = reg.apply(&s);
                rest = tail;
            }
            Err(_) => break,
        }
    }
    let bytes = encode_snapshot(&reg);
    let again = decode_snapshot(&bytes).expect("own snapshot decodes");
    // Compared as bytes: a NaN load average is not equal to itself.
    assert_eq!(encode_snapshot(&again), bytes);
});
