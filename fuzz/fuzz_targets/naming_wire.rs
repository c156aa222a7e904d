//! The registry's network messages: the first input byte picks the decoder, the rest is a
//! `Request::Naming` / `Response::Naming` payload (Raft RPCs and client requests, and their
//! answers) or a Raft snapshot. Every decode ends in a value or `NamingError::Malformed`;
//! whatever decodes encodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wisp_naming::registry::Registry;
use wisp_naming::store::{decode_snapshot, encode_snapshot};
use wisp_naming::wire::{decode, encode, NamingRequest, NamingResponse};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 => {
            if let Ok(r) = decode::<NamingRequest>(rest) {
                let _ = encode(&r);
            }
        }
        1 => {
            if let Ok(r) = decode::<NamingResponse>(rest) {
                let _ = encode(&r);
            }
        }
        2 => {
            let _ = decode_snapshot(rest);
        }
        _ => {
            // A snapshot body behind a valid header and checksum, so the fuzzer reaches the
            // registry decoder; what decodes survives a round trip.
            if let Ok(r) = postcard::from_bytes::<Registry>(rest) {
                let bytes = encode_snapshot(&r);
                let again = decode_snapshot(&bytes).expect("own snapshot decodes");
                // Compared as bytes: a NaN load average is not equal to itself.
                assert_eq!(encode_snapshot(&again), bytes);
            }
        }
    }
});
