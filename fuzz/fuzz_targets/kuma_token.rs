//! Token shape check on arbitrary text: no panic; an accepted token is one trimmed
//! line of three dot-separated parts, and checking it again accepts it unchanged.
#![no_main]

use kuma_model::token::check_token;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(t) = check_token(text) {
        assert_eq!(t.split('.').count(), 3);
        assert!(!t.contains('\n'));
        assert_eq!(check_token(&t).as_deref(), Ok(t.as_str()));
    }
});
