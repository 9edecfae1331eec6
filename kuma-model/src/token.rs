//! The shape of Kuma tokens (JWT), checked before a token is sent; the signature is
//! the control plane's to verify.

use serde_json::Value;

/// A token as kuma-dp accepts it: one line, a JWT (three base64url parts) whose header
/// names an `alg`. The signature is the control plane's to check.
pub fn check_token(raw: &str) -> Result<String, String> {
    let t = raw.trim();
    if t.is_empty() {
        return Err("the token is empty".into());
    }
    if t.contains(['\n', '\r', '\0']) {
        return Err("the token must be a single line".into());
    }
    let parts: Vec<&str> = t.split('.').collect();
    if parts.len() != 3 || parts.iter().take(2).any(|p| p.is_empty()) {
        return Err("the token is not a JWT (expected three dot-separated parts)".into());
    }
    let header = b64url(parts[0]).ok_or("the token's header is not base64url")?;
    let header: Value = serde_json::from_slice(&header).map_err(|_| "the token's header is not JSON".to_string())?;
    if !header.get("alg").is_some_and(Value::is_string) {
        return Err("the token's header has no `alg`".into());
    }
    b64url(parts[1]).ok_or("the token's payload is not base64url")?;
    Ok(t.to_string())
}

pub fn b64url(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEiLCJ0eXAiOiJKV1QifQ.eyJab25lIjoiem9uZS0xIn0.c2ln";

    #[test]
    fn tokens() {
        assert_eq!(check_token(&format!("{TOKEN}\n")).unwrap(), TOKEN);
        for (bad, why) in [
            ("", "empty"),
            ("abc", "not a JWT"),
            ("a.b", "not a JWT"),
            ("e30.e30.x", "no `alg`"),
            ("!!!.e30.x", "not base64url"),
            (&format!("{TOKEN}\n{TOKEN}"), "single line"),
        ] {
            let e = check_token(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
