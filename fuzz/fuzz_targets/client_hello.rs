//! `clienthello::parse` on arbitrary bytes: it must not panic, and a `Hello`
//! must be reproduced by exactly its consumed bytes, every shorter prefix of
//! which must still be undecided (`NeedMore`), never a different `Hello`.
#![no_main]

use clienthello::{MAX_ALPN, MAX_ALPN_LEN, MAX_SERVER_NAME_LEN, Parsed, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = parse(data);
    let Parsed::Hello(hello) = &parsed else {
        return;
    };

    let n = hello.consumed();
    assert!(n > 5 && n <= data.len(), "consumed {n} of {} bytes", data.len());
    assert_eq!(parse(&data[..n]), parsed, "the consumed bytes alone");
    for i in 0..n {
        assert_eq!(parse(&data[..i]), Parsed::NeedMore, "prefix of {i} bytes");
    }

    if let Some(name) = hello.server_name() {
        assert!(!name.is_empty() && name.len() <= MAX_SERVER_NAME_LEN);
    }
    assert!(hello.alpn().count() <= MAX_ALPN);
    assert!(hello.alpn().all(|id| !id.is_empty() && id.len() <= MAX_ALPN_LEN));
    // Debug never panics either.
    let _ = format!("{hello:?}");
});
