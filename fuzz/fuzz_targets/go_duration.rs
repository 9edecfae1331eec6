//! Go duration parsing: no panic, no overflow.
#![no_main]

use kuma_model::duration::parse_duration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_duration(s);
    }
});
