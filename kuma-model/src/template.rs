//! kuma-dp's dataplane templates: mustache variables filled from `--dataplane-var`.

use std::collections::BTreeMap;

/// Renders kuma-dp's mustache template: `{{ key }}` (HTML-escaped), `{{{ key }}}` and
/// `{{& key }}` (raw); a missing variable renders as nothing.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let (raw, body, close) =
            if let Some(b) = after.strip_prefix('{') { (true, b, "}}}") } else { (false, after, "}}") };
        let end = body.find(close).ok_or("the template has an unclosed `{{`")?;
        let mut key = body[..end].trim();
        let mut raw = raw;
        if let Some(k) = key.strip_prefix('&') {
            key = k.trim();
            raw = true;
        }
        if key.starts_with(['#', '^', '/', '>', '!', '=']) {
            return Err(format!("template tag `{{{{{key}}}}}` is not supported (only variables)"));
        }
        let value = vars.get(key).map(String::as_str).unwrap_or("");
        if raw {
            out.push_str(value);
        } else {
            for c in value.chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&#34;"),
                    '\'' => out.push_str("&#39;"),
                    c => out.push(c),
                }
            }
        }
        rest = &body[end + close.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `--dataplane-var k=v` pairs.
pub fn parse_vars(pairs: &[String]) -> Result<BTreeMap<String, String>, String> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("--dataplane-var {p:?} is not key=value")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let vars = parse_vars(&["name=dp-1".into(), "address=10.0.0.1".into(), "x=<a&b>".into()]).unwrap();
        let out =
            render("name: {{ name }}\naddr: {{address}}\nraw: {{{x}}} {{& x}}\nesc: {{x}}\nnone: [{{missing}}]", &vars)
                .unwrap();
        assert_eq!(out, "name: dp-1\naddr: 10.0.0.1\nraw: <a&b> <a&b>\nesc: &lt;a&amp;b&gt;\nnone: []");
        assert!(render("{{#list}}", &vars).unwrap_err().contains("not supported"));
        assert!(render("{{ open", &vars).unwrap_err().contains("unclosed"));
        assert!(parse_vars(&["novalue".into()]).is_err());
    }
}
