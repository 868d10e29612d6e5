//! Canonical JSON (RFC 8785, JCS) for evidence records and request digests.
//!
//! `serde_json_canonicalizer` is the reference: it handles every JSON value, but it boxes a
//! writer for each token and re-parses every key to sort it, and was a tenth of Dalil's CPU
//! under load (docs/performance.md). What Dalil hashes holds strings, integers, booleans,
//! nulls, arrays and objects; those are written here directly, with the same bytes. A value
//! with any other number (a fraction, or an integer beyond ±2^53, where JCS's IEEE-754 rules
//! apply) goes to the reference whole.

use serde_json::Value;

/// Integers up to this magnitude are exact as IEEE-754 doubles, so JCS writes them as plain
/// digits.
const EXACT: u64 = 1 << 53;

/// The canonical bytes of `value`.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    if write(value, &mut out) {
        out
    } else {
        serde_json_canonicalizer::to_vec(value).expect("a serde_json value is plain JSON")
    }
}

/// Writes `value` canonically; false (with `out` half written) when it holds a number this
/// writer leaves to the reference.
fn write(value: &Value, out: &mut Vec<u8>) -> bool {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64().filter(|u| *u <= EXACT) {
                out.extend_from_slice(u.to_string().as_bytes());
            } else if let Some(i) = n.as_i64().filter(|i| i.unsigned_abs() <= EXACT) {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0 && f.abs() <= EXACT as f64) {
                // An integral double (1.5e3): its digits, and "0" for -0, as ECMAScript prints it.
                out.extend_from_slice((f as i64).to_string().as_bytes());
            } else {
                return false;
            }
        }
        Value::String(s) => string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if !write(item, out) {
                    return false;
                }
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Keys in the order of their UTF-16 code units (RFC 8785, 3.2.3), which differs
            // from byte order only past U+FFFF.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(key, out);
                out.push(b':');
                if !write(item, out) {
                    return false;
                }
            }
            out.push(b'}');
        }
    }
    true
}

/// A string as JCS writes it: `"` and `\` escaped, control characters as `\b \t \n \f \r` or
/// `\u00xx` (lowercase), everything else as it is — serde_json's own escaping.
fn string(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reference(v: &Value) -> Vec<u8> {
        serde_json_canonicalizer::to_vec(v).unwrap()
    }

    #[test]
    fn writes_what_the_reference_writes() {
        let cases = [
            json!(null),
            json!({}),
            json!([]),
            json!({ "b": 1, "a": [true, null, "oʻ"], "c": { "z": 1.5e3, "y": "x" } }),
            json!({ "q": "\"\\/\u{7f}\u{2028}\u{0}\u{1f}\u{8}\u{c}\n\r\t", "e": "é😀𝄞\u{e000}\u{ffff}" }),
            // U+E000 sorts before U+1F600 by code point, after it by UTF-16 code unit.
            json!({ "\u{e000}": 1, "😀": 2, "a": 3, "A": 4, "": 5, "é": 6 }),
            json!([0, -0.0, -1, 9007199254740992_u64, -9007199254740992_i64, 1e15, -2.0]),
            json!({ "deep": [[[{ "x": [{}] }]]] }),
        ];
        for v in cases {
            assert_eq!(String::from_utf8(to_vec(&v)).unwrap(), String::from_utf8(reference(&v)).unwrap(), "{v}");
        }
    }

    #[test]
    fn numbers_past_its_reach_go_to_the_reference() {
        for v in [json!(1.5), json!(9007199254740993_u64), json!(u64::MAX), json!(i64::MIN), json!(1e300), json!(1e-7)]
        {
            let wrapped = json!({ "n": [v] });
            assert!(!write(&wrapped, &mut Vec::new()), "{wrapped}");
            assert_eq!(to_vec(&wrapped), reference(&wrapped));
        }
    }

    /// Random values over the kinds evidence holds, compared with the reference byte for byte.
    #[test]
    fn random_values_match_the_reference() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const CHARS: [char; 16] =
            ['a', 'Z', '0', ' ', '"', '\\', '/', '\n', '\u{1}', '\u{7f}', 'ʻ', 'ё', '\u{2028}', '\u{e000}', '😀', '𝄞'];
        fn value(depth: u32, next: &mut dyn FnMut() -> u64) -> Value {
            let text = |next: &mut dyn FnMut() -> u64| -> String {
                (0..next() % 6).map(|_| CHARS[(next() % CHARS.len() as u64) as usize]).collect()
            };
            match next() % if depth > 3 { 5 } else { 7 } {
                0 => Value::Null,
                1 => Value::Bool(next() % 2 == 0),
                2 => json!((next() % (2 * EXACT)) as i64 - EXACT as i64),
                3 => json!(next() % 1000),
                4 => Value::String(text(next)),
                5 => Value::Array((0..next() % 4).map(|_| value(depth + 1, next)).collect()),
                _ => Value::Object((0..next() % 5).map(|_| (text(next), value(depth + 1, next))).collect()),
            }
        }
        for _ in 0..3000 {
            let v = value(0, &mut next);
            assert_eq!(to_vec(&v), reference(&v), "{v}");
        }
    }
}
