//! Binding matching for topic and headers exchanges (pure functions, used
//! by [`super::Topology::route`]).

use sluice_codecs::command::{Arguments, FieldValue};

/// AMQP topic match: words separated by '.', `*` matches exactly one word,
/// `#` matches zero or more words. Dynamic programming over words, so a
/// pattern full of `#` cannot blow up.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() { vec![""] } else { key.split('.').collect() };
    // m[j] = pattern prefix p[..i] matches key prefix k[..j]
    let mut m = vec![false; k.len() + 1];
    m[0] = true;
    for word in &p {
        let mut next = vec![false; k.len() + 1];
        if *word == "#" {
            let mut reach = false;
            for j in 0..=k.len() {
                reach |= m[j];
                next[j] = reach;
            }
        } else {
            for j in 1..=k.len() {
                next[j] = m[j - 1] && (*word == "*" || *word == k[j - 1]);
            }
        }
        m = next;
    }
    // An empty routing key is the single empty word; "#" alone matches it.
    m[k.len()] || (key.is_empty() && p.iter().all(|w| *w == "#"))
}

/// Headers exchange match, as RabbitMQ: `x-match` = all (default), any,
/// all-with-x, any-with-x. Binding keys starting with "x-" are ignored
/// unless the -with-x variant is used. A void binding value only requires
/// the header to be present.
pub fn headers_match(binding: &Arguments, headers: Option<&Arguments>) -> bool {
    let mode = binding.get("x-match").and_then(|v| v.as_str()).unwrap_or("all").to_string();
    let (any, with_x) = match mode.as_str() {
        "any" => (true, false),
        "any-with-x" => (true, true),
        "all-with-x" => (false, true),
        _ => (false, false),
    };
    let mut checked = 0;
    let mut matched = 0;
    for (k, v) in binding.iter() {
        if k == "x-match" || (!with_x && k.starts_with("x-")) {
            continue;
        }
        checked += 1;
        let ok = match headers.and_then(|h| h.get(k)) {
            None => false,
            Some(h) => matches!(v, FieldValue::Void) || values_equal(v, h),
        };
        if ok {
            matched += 1;
        }
    }
    if any {
        matched > 0
    } else {
        matched == checked
    }
}

/// Integers compare by value across widths (RabbitMQ clients differ in
/// which integer type they send); everything else compares exactly.
fn values_equal(a: &FieldValue, b: &FieldValue) -> bool {
    match (a.as_i64(), b.as_i64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_cases() {
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("#", "", true),
            ("#", "anything.at.all", true),
            ("#.c", "c", true),
            ("#.c", "a.b.c", true),
            ("*.c", "c", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.x.y.c", true),
            ("a.#.c", "a.x.y.d", false),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("#.#", "a.b", true),
            ("*.*", "a", false),
        ];
        for (p, k, want) in cases {
            assert_eq!(topic_matches(p, k), want, "pattern {p:?} key {k:?}");
        }
    }

    #[test]
    fn headers_all_any() {
        let mut b = Arguments::default();
        b.insert("x-match", FieldValue::LongString("any".into()));
        b.insert("a", FieldValue::I32(1));
        b.insert("b", FieldValue::LongString("x".into()));
        let mut h = Arguments::default();
        h.insert("a", FieldValue::I64(1));
        assert!(headers_match(&b, Some(&h)));
        b.insert("x-match", FieldValue::LongString("all".into()));
        assert!(!headers_match(&b, Some(&h)));
        h.insert("b", FieldValue::LongString("x".into()));
        assert!(headers_match(&b, Some(&h)));
        assert!(!headers_match(&b, None));
    }
}
