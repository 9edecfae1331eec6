//! Envoy's `StringMatcher`, as far as `dp` honours it (exact, prefix, suffix, contains,
//! optionally ignoring ASCII case). `safe_regex` is refused: no regex engine on the data
//! path.

use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StringMatch {
    pub pattern: Pattern,
    /// The pattern is stored lowercased when set.
    pub ignore_case: bool,
}

impl StringMatch {
    pub fn new(pattern: Pattern, ignore_case: bool) -> StringMatch {
        let pattern = if ignore_case {
            match pattern {
                Pattern::Exact(s) => Pattern::Exact(s.to_ascii_lowercase()),
                Pattern::Prefix(s) => Pattern::Prefix(s.to_ascii_lowercase()),
                Pattern::Suffix(s) => Pattern::Suffix(s.to_ascii_lowercase()),
                Pattern::Contains(s) => Pattern::Contains(s.to_ascii_lowercase()),
            }
        } else {
            pattern
        };
        StringMatch { pattern, ignore_case }
    }

    pub fn from_proto(m: &StringMatcher) -> Result<StringMatch, String> {
        let pattern = match &m.match_pattern {
            Some(MatchPattern::Exact(s)) => Pattern::Exact(s.clone()),
            Some(MatchPattern::Prefix(s)) => Pattern::Prefix(s.clone()),
            Some(MatchPattern::Suffix(s)) => Pattern::Suffix(s.clone()),
            Some(MatchPattern::Contains(s)) => Pattern::Contains(s.clone()),
            Some(MatchPattern::SafeRegex(_)) => return Err("safe_regex is not supported".into()),
            Some(MatchPattern::Custom(_)) => return Err("custom matchers are not supported".into()),
            None => return Err("the string matcher has no pattern".into()),
        };
        Ok(StringMatch::new(pattern, m.ignore_case))
    }

    pub fn matches(&self, value: &str) -> bool {
        let lower;
        let value = if self.ignore_case {
            lower = value.to_ascii_lowercase();
            lower.as_str()
        } else {
            value
        };
        match &self.pattern {
            Pattern::Exact(p) => value == p,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(p) => value.ends_with(p.as_str()),
            Pattern::Contains(p) => value.contains(p.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_case() {
        let m = |p, ic| StringMatch::new(p, ic);
        assert!(m(Pattern::Exact("a.B".into()), false).matches("a.B"));
        assert!(!m(Pattern::Exact("a.B".into()), false).matches("a.b"));
        assert!(m(Pattern::Exact("a.B".into()), true).matches("A.b"));
        assert!(m(Pattern::Prefix("spiffe://m/".into()), false).matches("spiffe://m/web"));
        assert!(m(Pattern::Suffix(".mesh".into()), true).matches("X.MESH"));
        assert!(m(Pattern::Contains("/we".into()), false).matches("spiffe://m/web"));
        assert!(!m(Pattern::Contains("/we".into()), false).matches("spiffe://m/api"));
    }
}
