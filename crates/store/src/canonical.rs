//! Canonical JSON, exactly as `docs/audit-format.md` ("Canonical JSON")
//! specifies it: the bytes the audit hash chain is computed over.
//!
//! * no whitespace; object members sorted by the UTF-8 bytes of their keys
//!   (Rust's `str` ordering is exactly that), each key once (a
//!   [`serde_json::Map`] cannot hold a key twice);
//! * strings: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, every other
//!   character below U+0020 as `\u00xx` (lowercase hex), everything else —
//!   `/`, U+007F, all non-ASCII — as itself in UTF-8;
//! * integers (a [`serde_json::Number`] that is a `u64` or an `i64`): plain
//!   decimal;
//! * every other number (an `f64`): the shortest decimal that reads back as
//!   the same double (ties to even), laid out as the `ryu` crate writes it
//!   — `0.1`, `1e-7`, `1.0`, `-0.0`, `100.0`, `0.00001`, `1e16`,
//!   `1.7976931348623157e308`: plain for `1e-5 <= |x| < 1e16`, scientific
//!   otherwise, never an exponent `+` (the function that writes doubles
//!   states the exact rules; `serde_json` 1.0.154 itself writes `e+308`,
//!   so its layout is not used, only its digits).
//!
//! Which numbers are integers is decided the way `serde_json` parses them:
//! a number token without fraction or exponent that fits `u64` or `i64` is
//! an integer; everything else is a double — `1.0` stays `1.0`, `1e2`
//! becomes `100.0`, `-0` becomes `-0.0`, `18446744073709551616` (above
//! `u64::MAX`) becomes `1.8446744073709552e19`. Canonicalizing a value
//! and canonicalizing that value written out and parsed back give the same
//! text (the crate enables `serde_json`'s `float_roundtrip`, so parsing a
//! shortest-form double is exact).
//!
//! The order of members in the [`serde_json::Map`] does not matter (this
//! workspace enables `preserve_order`, so maps keep insertion order): keys
//! are sorted here.

use std::fmt::Write as _;

use serde_json::{Map, Number, Value};

use crate::{AuditEvent, NewEvent};

/// The canonical form of `value`.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// The canonical form of the object `map` without its member `skip` (the
/// record without `hash`), with no copy of the map.
pub(crate) fn canonical_object_without(map: &Map<String, Value>, skip: &str) -> String {
    let mut out = String::new();
    write_object(&mut out, map, Some(skip));
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map, None),
    }
}

fn write_object(out: &mut String, map: &Map<String, Value>, skip: Option<&str>) {
    let mut members: Vec<(&String, &Value)> = map
        .iter()
        .filter(|(key, _)| Some(key.as_str()) != skip)
        .collect();
    // `str` ordering compares the UTF-8 bytes, as the format requires.
    members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push('{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_value(out, value);
    }
    out.push('}');
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(f) = n.as_f64() {
        write_double(out, f);
    } else {
        // Unreachable: without `arbitrary_precision` every number is one of
        // the three. Keep the output valid JSON anyway.
        out.push_str("null");
    }
}

/// A double: its shortest round-trip digits, laid out as the `ryu` crate
/// lays them out (which is what `serde_json` wrote when the format was
/// written, and what the format's examples show).
///
/// The digits are the fewest significant digits that read back as the same
/// double; of several such, the closest to the double's exact value; of two
/// equally close, the one with an even last digit (`1690060720831323.25`
/// is written `1690060720831323.2`). With `kk` the position of the decimal
/// point (`10^(kk-1) <= |f| < 10^kk`) the layout is:
///
/// * no fraction digits and `kk <= 16`: the digits, zeros up to the point,
///   `.0` (`100.0`, `1000000000000000.0`);
/// * `0 < kk <= 16`: the digits with the point inside (`1.5`, `123.456`);
/// * `-5 < kk <= 0`: `0.`, `-kk` zeros, the digits (`0.1`, `0.00001`);
/// * otherwise scientific: the first digit, then `.` and the others if
///   there are others, `e`, the exponent in decimal with `-` but never `+`
///   (`1e-7`, `1e16`, `1.7976931348623157e308`);
/// * zero is `0.0` or `-0.0`.
///
/// The digits are taken from `serde_json`'s own output (shortest, correctly
/// rounded, ties to even — Rust's `{:e}` breaks ties upwards instead, so it
/// is not used); the layout is applied here because `serde_json`'s is not
/// stable across its versions (1.0.154 writes `1.7976931348623157e+308`).
fn write_double(out: &mut String, f: f64) {
    if f.is_sign_negative() {
        out.push('-');
    }
    let f = f.abs();
    if f == 0.0 {
        out.push_str("0.0");
        return;
    }
    let Some((digits, exponent)) = serde_json::to_string(&f)
        .ok()
        .and_then(|text| digits_and_exponent(&text))
    else {
        // Unreachable for a finite double; still write a number.
        let _ = write!(out, "{f:e}");
        return;
    };
    let length = i64::try_from(digits.len()).unwrap_or(i64::MAX);
    let kk = exponent.saturating_add(1);
    let k = kk.saturating_sub(length);
    if 0 <= k && kk <= 16 {
        out.push_str(&digits);
        push_zeros(out, k);
        out.push_str(".0");
    } else if 0 < kk && kk <= 16 {
        let point = usize::try_from(kk).unwrap_or(0).min(digits.len());
        let (int, frac) = digits.split_at(point);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    } else if -5 < kk && kk <= 0 {
        out.push_str("0.");
        push_zeros(out, -kk);
        out.push_str(&digits);
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let _ = write!(out, "e{}", kk - 1);
    }
}

/// The significant digits of a positive decimal number written in any
/// JSON layout (`123.45`, `0.00012`, `1.5e+16`, `1E-7`), without leading or
/// trailing zeros, and the power of ten of the first of them.
fn digits_and_exponent(text: &str) -> Option<(String, i64)> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => {
            let (mantissa, exponent) = text.split_at(at);
            let exponent = exponent.get(1..)?;
            (
                mantissa,
                exponent
                    .strip_prefix('+')
                    .unwrap_or(exponent)
                    .parse::<i64>()
                    .ok()?,
            )
        }
        None => (text, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let all = format!("{int}{frac}");
    let significant = all.trim_start_matches('0');
    let leading = all.len() - significant.len();
    let digits = significant.trim_end_matches('0');
    if digits.is_empty() {
        return None;
    }
    let int_len = i64::try_from(int.len()).ok()?;
    let leading = i64::try_from(leading).ok()?;
    Some((digits.to_owned(), exponent + int_len - 1 - leading))
}

fn push_zeros(out: &mut String, count: i64) {
    for _ in 0..count {
        out.push('0');
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn write_string(out: &mut String, s: &str) {
    out.push('"');
    // Runs of characters that stand for themselves are copied whole; only
    // `"`, `\\` and the controls below U+0020 are escaped. They are all
    // ASCII, so a byte index next to one is always a character boundary.
    let bytes = s.as_bytes();
    let mut run_start = 0;
    let mut at = 0;
    while at < bytes.len() {
        // Skip eight plain bytes at a time.
        if let Some(word) = bytes
            .get(at..at + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            && !needs_escape(u64::from_le_bytes(word))
        {
            at += 8;
            continue;
        }
        let byte = bytes.get(at).copied().unwrap_or(0);
        at += 1;
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(s.get(run_start..at - 1).unwrap_or_default());
        run_start = at;
        if escape.is_empty() {
            out.push_str("\\u00");
            for nibble in [byte >> 4, byte & 0xf] {
                let digit = HEX.get(usize::from(nibble)).copied().unwrap_or(b'0');
                out.push(char::from(digit));
            }
        } else {
            out.push_str(escape);
        }
    }
    out.push_str(s.get(run_start..).unwrap_or_default());
    out.push('"');
}

/// Whether any of the eight bytes of `word` is `"`, `\\` or below 0x20
/// (the usual word-at-a-time tests: a byte is zero, a byte is below n).
const fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const fn zero_byte(w: u64) -> u64 {
        w.wrapping_sub(ONES) & !w & HIGHS
    }
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    let quote = zero_byte(word ^ (ONES * b'"' as u64));
    let backslash = zero_byte(word ^ (ONES * b'\\' as u64));
    control | quote | backslash != 0
}

/// The canonical form of an audit record without its `hash` member, written
/// straight from its fields, and where `hash` belongs in it.
///
/// The text is the same bytes as [`canonical_object_without`] over
/// `serde_json::to_value(record)` with `"hash"` skipped (the tests compare
/// the two for every field, present and absent), without building that
/// value. Members are omitted exactly where serialization omits them
/// (`None`, an empty `policy_ids`); `args` is canonicalized like any value.
/// [`RecordText::with_hash`] then gives the canonical form of the whole
/// record, which is how the stores keep it: one serialization for both.
pub(crate) struct RecordText {
    /// The canonical JSON without `hash`: what the hash is computed over.
    pub(crate) text: String,
    /// The byte offset of the separator (`{` or `,`) before the first member
    /// that sorts after `hash`.
    hash_at: usize,
}

impl RecordText {
    pub(crate) fn new(record: &AuditEvent) -> Self {
        // Every field by name, without `..`: a field added to the record
        // does not compile until it is written here too.
        let AuditEvent {
            seq,
            event,
            prev_hash,
            hash: _,
        } = record;
        let NewEvent {
            ts,
            kind,
            task_id,
            agent_id,
            tool,
            decision,
            reason,
            policy_ids,
            args,
            result_digest,
            latency_us,
            state_from,
            state_to,
            jti,
            detail,
        } = event;
        let mut text = String::with_capacity(512);
        let mut members = Members {
            out: &mut text,
            first: true,
        };
        // The members in canonical (byte) order.
        members.string("agent_id", agent_id.as_deref());
        if let Some(args) = args {
            write_value(members.key("args"), args);
        }
        members.string("decision", decision.as_deref());
        members.string("detail", detail.as_deref());
        // `hash` sorts here.
        let hash_at = members.out.len();
        members.string("jti", jti.as_deref());
        members.string("kind", Some(kind.as_str()));
        if let Some(latency) = latency_us {
            members.integer("latency_us", *latency);
        }
        if !policy_ids.is_empty() {
            let out = members.key("policy_ids");
            out.push('[');
            for (i, id) in policy_ids.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, id);
            }
            out.push(']');
        }
        members.string("prev_hash", Some(prev_hash));
        members.string("reason", reason.as_deref());
        members.string("result_digest", result_digest.as_deref());
        members.integer("seq", *seq);
        members.string("state_from", state_from.as_deref());
        members.string("state_to", state_to.as_deref());
        members.string("task_id", task_id.as_deref());
        members.string("tool", tool.as_deref());
        members.integer("ts", ts.0);
        members.finish();
        Self { text, hash_at }
    }

    /// The canonical form of the record with `hash` as its `hash` member.
    pub(crate) fn with_hash(&self, hash: &str) -> String {
        // Members after `hash` always exist (`kind`, `prev_hash`, `seq`,
        // `ts`), so the text goes on at `hash_at` with a separator: `,`
        // after members before `hash`, `{` when there are none.
        let (before, after) = self.text.split_at(self.hash_at.min(self.text.len()));
        let mut out = String::with_capacity(self.text.len() + hash.len() + 10);
        out.push_str(before);
        out.push(if before.is_empty() { '{' } else { ',' });
        out.push_str("\"hash\":");
        write_string(&mut out, hash);
        out.push(',');
        out.push_str(after.get(1..).unwrap_or_default());
        out
    }
}

/// The members of an object being written in canonical order.
struct Members<'a> {
    out: &'a mut String,
    first: bool,
}

impl Members<'_> {
    /// Starts the member `key` (plain ASCII, nothing to escape) and returns
    /// the buffer for its value.
    fn key(&mut self, key: &str) -> &mut String {
        self.out.push(if self.first { '{' } else { ',' });
        self.first = false;
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
        self.out
    }

    fn string(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            write_string(self.key(key), value);
        }
    }

    fn integer(&mut self, key: &str, value: u64) {
        let _ = write!(self.key(key), "{value}");
    }

    /// Closes the object (`{}` if it had no member).
    fn finish(self) {
        if self.first {
            self.out.push('{');
        }
        self.out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn canon(text: &str) -> String {
        canonical_json(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn keys_are_sorted_by_utf8_bytes() {
        // Byte order: upper case before lower case, "a" before "ab", and
        // non-ASCII (é = C3 A9, 日 = E6 97 A5, 😀 = F0 9F 98 80) after ASCII,
        // by their first byte — not by UTF-16 units (which would put U+FFFF
        // "\u{ffff}" = EF BF BF after the emoji).
        assert_eq!(
            canon(r#"{"b":1,"ab":2,"a":3,"B":4,"é":5,"日":6,"😀":7,"\uffff":8,"z":9,"":0}"#),
            "{\"\":0,\"B\":4,\"a\":3,\"ab\":2,\"b\":1,\"z\":9,\"é\":5,\"日\":6,\"\u{ffff}\":8,\"😀\":7}"
        );
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let mut one = Map::new();
        one.insert("z".into(), json!(1));
        one.insert("a".into(), json!(2));
        let mut two = Map::new();
        two.insert("a".into(), json!(2));
        two.insert("z".into(), json!(1));
        assert_eq!(
            canonical_json(&Value::Object(one)),
            canonical_json(&Value::Object(two))
        );
    }

    #[test]
    fn nesting_and_no_whitespace() {
        assert_eq!(
            canon(
                r#" { "outer" : { "y" : [ 3 , { "d" : null , "c" : [ ] } , "s" ] , "x" : { } } ,
                     "arr" : [ true , false , [ [ ] ] ] } "#
            ),
            r#"{"arr":[true,false,[[]]],"outer":{"x":{},"y":[3,{"c":[],"d":null},"s"]}}"#
        );
        assert_eq!(canon("[]"), "[]");
        assert_eq!(canon("{}"), "{}");
        assert_eq!(canon("null"), "null");
        // Arrays keep their order.
        assert_eq!(canon("[3,1,2]"), "[3,1,2]");
    }

    #[test]
    fn string_escapes() {
        assert_eq!(
            canonical_json(&json!("q\" b\\ \u{08}\u{0c}\n\r\t end")),
            r#""q\" b\\ \b\f\n\r\t end""#
        );
        // Every other control character is \u00xx, lowercase hex.
        assert_eq!(
            canonical_json(&json!("\u{00}\u{01}\u{07}\u{0b}\u{0e}\u{1a}\u{1f}")),
            r#""\u0000\u0001\u0007\u000b\u000e\u001a\u001f""#
        );
        // `/`, DEL (U+007F), U+2028 and non-ASCII are written as themselves.
        assert_eq!(
            canonical_json(&json!("a/b \u{7f} \u{2028} é 日本 😀 \u{ffff}")),
            "\"a/b \u{7f} \u{2028} é 日本 😀 \u{ffff}\""
        );
        // Escapes in the input are decoded first: the output depends on the
        // characters, not on how the source spelled them.
        assert_eq!(canon(r#""\u00e9\/\u0041\ud83d\ude00""#), "\"é/A😀\"");
        // Keys are escaped like strings.
        assert_eq!(canon(r#"{"a\nb":1}"#), r#"{"a\nb":1}"#);
    }

    #[test]
    fn integers() {
        assert_eq!(canonical_json(&json!(0)), "0");
        assert_eq!(canonical_json(&json!(-1)), "-1");
        assert_eq!(canonical_json(&json!(42)), "42");
        assert_eq!(canonical_json(&json!(u64::MAX)), "18446744073709551615");
        assert_eq!(canonical_json(&json!(i64::MIN)), "-9223372036854775808");
        assert_eq!(canon("18446744073709551615"), "18446744073709551615");
        assert_eq!(canon("-9223372036854775808"), "-9223372036854775808");
    }

    #[test]
    fn floats() {
        assert_eq!(canonical_json(&json!(0.1)), "0.1");
        assert_eq!(canonical_json(&json!(1.5)), "1.5");
        assert_eq!(canonical_json(&json!(-2.25)), "-2.25");
        assert_eq!(canonical_json(&json!(1e-7)), "1e-7");
        assert_eq!(canonical_json(&json!(0.1 + 0.2)), "0.30000000000000004");
        assert_eq!(canonical_json(&json!(f64::MAX)), "1.7976931348623157e308");
        assert_eq!(canonical_json(&json!(5e-324)), "5e-324");
        assert_eq!(canonical_json(&json!(1e21)), "1e21");
        assert_eq!(
            canonical_json(&json!(-1.7976931348623157e308)),
            "-1.7976931348623157e308"
        );
        assert_eq!(canonical_json(&json!(1.2345e-300)), "1.2345e-300");
        // The layout thresholds: up to 16 integer digits plain, then
        // scientific; down to 0.00001 plain, then scientific.
        assert_eq!(canonical_json(&json!(1e15)), "1000000000000000.0");
        assert_eq!(canonical_json(&json!(1.5e15)), "1500000000000000.0");
        assert_eq!(canonical_json(&json!(1e16)), "1e16");
        assert_eq!(canonical_json(&json!(1.5e16)), "1.5e16");
        assert_eq!(
            canonical_json(&json!(1234567890123456.7)),
            "1234567890123456.8"
        );
        assert_eq!(
            canonical_json(&json!(12_345_678_901_234_567.0)),
            "1.2345678901234568e16"
        );
        assert_eq!(canonical_json(&json!(123.456)), "123.456");
        assert_eq!(canonical_json(&json!(100.0)), "100.0");
        assert_eq!(canonical_json(&json!(0.001234)), "0.001234");
        assert_eq!(canonical_json(&json!(1e-5)), "0.00001");
        assert_eq!(canonical_json(&json!(1.5e-5)), "0.000015");
        assert_eq!(canonical_json(&json!(1e-6)), "1e-6");
        assert_eq!(canonical_json(&json!(1.5e-6)), "1.5e-6");
        // A double with an integral value is still a double: `1.0`.
        assert_eq!(canonical_json(&json!(1.0)), "1.0");
        assert_eq!(canon("1.0"), "1.0");
        assert_eq!(canon("1e2"), "100.0");
        assert_eq!(canon("1E+2"), "100.0");
        assert_eq!(canon("0.10"), "0.1");
        // Negative zero keeps its sign, whether written -0.0 or -0 (which
        // serde_json parses as the double -0.0, not the integer 0).
        assert_eq!(canonical_json(&json!(-0.0)), "-0.0");
        assert_eq!(canon("-0"), "-0.0");
        assert_eq!(canon("-0.0"), "-0.0");
        assert_eq!(canon("0"), "0");
        // Beyond the 64-bit integers: a double.
        assert_eq!(canon("18446744073709551616"), "1.8446744073709552e19");
        assert_eq!(canon("-9223372036854775809"), "-9.223372036854776e18");
    }

    /// Writing a value out (as the ledger stores it) and parsing it back
    /// canonicalizes to the same text: what the writer hashed is what a
    /// verifier reading the stored JSON recomputes.
    #[test]
    fn canonical_form_survives_a_round_trip() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut floats = vec![
            0.1,
            1e-7,
            1.0 / 3.0,
            2.0_f64.sqrt(),
            -0.0,
            f64::MIN_POSITIVE,
        ];
        for _ in 0..20_000 {
            // xorshift: arbitrary bit patterns, so every exponent and long
            // mantissas are covered.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let f = f64::from_bits(state);
            if f.is_finite() {
                floats.push(f);
            }
        }
        for f in floats {
            // The text reads back as the very same double.
            let text = canonical_json(&json!(f));
            assert_eq!(
                text.parse::<f64>().unwrap().to_bits(),
                f.to_bits(),
                "{text}"
            );
            let value = json!({"f": f, "s": "x\u{1}/é", "n": [1, -1, u64::MAX]});
            let text = serde_json::to_string(&value).unwrap();
            let back: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(canonical_json(&back), canonical_json(&value), "{f:e}");
        }
    }

    /// Of two equally close shortest candidates, the even one (as `ryu`,
    /// `serde_json`, JavaScript and Python choose; Rust's `{:e}` would
    /// write `...323.3`). The doubles are exact: 1690060720831323.25 and so
    /// on, built from integers below 2^53.
    #[test]
    fn ties_go_to_the_even_digit() {
        assert_eq!(
            canonical_json(&json!(6_760_242_883_325_293_f64 / 4.0)),
            "1690060720831323.2"
        );
        assert_eq!(
            canonical_json(&json!(1_864_927_124_118_369_f64 / 8.0)),
            "233115890514796.12"
        );
        assert_eq!(
            canonical_json(&json!(-3_154_307_535_133_093_f64 / 4.0)),
            "-788576883783273.2"
        );
    }

    #[test]
    fn digits_of_any_layout() {
        let d = |text: &str| digits_and_exponent(text).unwrap();
        assert_eq!(d("123.45"), ("12345".into(), 2));
        assert_eq!(d("0.00012"), ("12".into(), -4));
        assert_eq!(d("1.5e+16"), ("15".into(), 16));
        assert_eq!(d("1.5e16"), ("15".into(), 16));
        assert_eq!(d("1E-7"), ("1".into(), -7));
        assert_eq!(d("100.0"), ("1".into(), 2));
        assert_eq!(d("7"), ("7".into(), 0));
        assert_eq!(digits_and_exponent("0.0"), None);
        assert_eq!(digits_and_exponent("1x"), None);
        assert_eq!(digits_and_exponent("1e"), None);
    }

    #[test]
    fn object_without_a_member() {
        let Value::Object(map) = json!({"hash": "h", "seq": 1, "a": "b"}) else {
            unreachable!()
        };
        assert_eq!(
            canonical_object_without(&map, "hash"),
            r#"{"a":"b","seq":1}"#
        );
        assert_eq!(
            canonical_object_without(&map, "none"),
            r#"{"a":"b","hash":"h","seq":1}"#
        );
    }

    /// Every byte that needs an escape, and its neighbours on each side of
    /// the escape set, at every position of a string longer than two words
    /// (the writer skips plain text eight bytes at a time).
    #[test]
    fn escapes_at_every_position_match_serde_json() {
        let specials = (0u8..0x20).chain([b'"', b'\\', b' ', b'!', b'#', b'[', b']', 0x7f]);
        for special in specials {
            for at in 0..20 {
                let mut bytes = vec![b'a'; 20];
                bytes[at] = special;
                let s = String::from_utf8(bytes).unwrap();
                assert_eq!(
                    canonical_json(&Value::String(s.clone())),
                    serde_json::to_string(&s).unwrap(),
                    "{s:?}"
                );
            }
        }
        let mixed = "日本語 text with \"quotes\" and\ttabs, é and 😀\u{1}".repeat(3);
        assert_eq!(
            canonical_json(&Value::String(mixed.clone())),
            serde_json::to_string(&mixed).unwrap()
        );
    }

    /// The record writer against the generic one, over every member of a
    /// record: all present, all absent, and each alone.
    #[test]
    fn typed_record_matches_the_value_for_each_member() {
        use crate::{EventKind, NewEvent};
        use portcullis_core::Timestamp;

        let full = || {
            let mut event = NewEvent::new(Timestamp(u64::MAX), EventKind::CallAllowed);
            event.task_id = Some("t\u{1}\"".into());
            event.agent_id = Some("a/é".into());
            event.tool = Some("x.y".into());
            event.decision = Some("allow".into());
            event.reason = Some("r".into());
            event.policy_ids = vec!["p1".into(), "\\".into()];
            event.args = Some(json!({"z": [1, -2, 0.5, null, {"b": true, "a": "\n"}], "": {}}));
            event.result_digest = Some("d".into());
            event.latency_us = Some(0);
            event.state_from = Some("s".into());
            event.state_to = Some("u".into());
            event.jti = Some("j".into());
            event.detail = Some("\u{7f}日".into());
            AuditEvent {
                seq: u64::MAX,
                event,
                prev_hash: "p".repeat(64),
                hash: "ignored".into(),
            }
        };
        let check = |record: &AuditEvent| {
            let Value::Object(map) = serde_json::to_value(record).unwrap() else {
                unreachable!()
            };
            let typed = RecordText::new(record);
            assert_eq!(
                typed.text,
                canonical_object_without(&map, "hash"),
                "{record:?}"
            );
            assert_eq!(
                typed.with_hash(&record.hash),
                canonical_json(&Value::Object(map)),
                "{record:?}"
            );
        };
        check(&full());
        let mut bare = full();
        bare.event = NewEvent::new(Timestamp(0), EventKind::TaskStarted);
        bare.seq = 0;
        check(&bare);
        // `Some(null)` arguments are a member with the value null.
        bare.event.args = Some(Value::Null);
        check(&bare);
        for kind in EventKind::ALL {
            bare.event.kind = kind;
            check(&bare);
        }
        for member in 0..12 {
            let mut one = full();
            let e = &mut one.event;
            match member {
                0 => e.task_id = None,
                1 => e.agent_id = None,
                2 => e.tool = None,
                3 => e.decision = None,
                4 => e.reason = None,
                5 => e.policy_ids.clear(),
                6 => e.args = None,
                7 => e.result_digest = None,
                8 => e.latency_us = None,
                9 => e.state_from = None,
                10 => e.jti = None,
                _ => e.detail = None,
            }
            check(&one);
        }
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        use super::super::*;
        use crate::{EventKind, NewEvent};
        use portcullis_core::Timestamp;

        fn text() -> impl Strategy<Value = String> {
            // Controls, quotes, backslashes, non-ASCII and astral
            // characters, mixed with plain text.
            prop::collection::vec(
                prop_oneof![
                    3 => any::<char>(),
                    2 => prop::char::range('\u{0}', '\u{7f}'),
                    1 => prop::sample::select(vec!['"', '\\', '\n', '\u{1f}', '\u{7f}', 'é']),
                ],
                0..24,
            )
            .prop_map(|chars| chars.into_iter().collect())
        }

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<u64>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                text().prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::vec((text(), inner), 0..6).prop_map(|members| Value::Object(
                        members.into_iter().collect::<Map<_, _>>()
                    )),
                ]
            })
        }

        fn record() -> impl Strategy<Value = AuditEvent> {
            let strings = prop::collection::vec(prop::option::of(text()), 10);
            (
                any::<u64>(),
                any::<u64>(),
                prop::sample::select(EventKind::ALL.to_vec()),
                strings,
                prop::collection::vec(text(), 0..3),
                prop::option::of(json()),
                prop::option::of(any::<u64>()),
                text(),
            )
                .prop_map(
                    |(seq, ts, kind, strings, policy_ids, args, latency_us, prev_hash)| {
                        let mut s = strings.into_iter();
                        let mut event = NewEvent::new(Timestamp(ts), kind);
                        event.task_id = s.next().flatten();
                        event.agent_id = s.next().flatten();
                        event.tool = s.next().flatten();
                        event.decision = s.next().flatten();
                        event.reason = s.next().flatten();
                        event.result_digest = s.next().flatten();
                        event.state_from = s.next().flatten();
                        event.state_to = s.next().flatten();
                        event.jti = s.next().flatten();
                        event.detail = s.next().flatten();
                        event.policy_ids = policy_ids;
                        event.args = args;
                        event.latency_us = latency_us;
                        AuditEvent {
                            seq,
                            event,
                            prev_hash,
                            hash: format!("h{seq:x}"),
                        }
                    },
                )
        }

        proptest! {
            /// A string is written exactly as `serde_json` writes it (the
            /// same escapes, nothing else escaped) and reads back as itself.
            #[test]
            fn strings_match_serde_json(s in text()) {
                let canonical = canonical_json(&Value::String(s.clone()));
                prop_assert_eq!(&canonical, &serde_json::to_string(&s).unwrap());
                prop_assert_eq!(serde_json::from_str::<String>(&canonical).unwrap(), s);
            }

            /// The typed record writer gives the bytes of the generic
            /// writer over the record's JSON value: the hash the writers
            /// store is the hash a verifier of exported JSON computes.
            #[test]
            fn typed_records_match_their_json_value(record in record()) {
                let Value::Object(map) = serde_json::to_value(&record).unwrap() else {
                    unreachable!()
                };
                let typed = RecordText::new(&record);
                prop_assert_eq!(&typed.text, &canonical_object_without(&map, "hash"));
                prop_assert_eq!(
                    typed.with_hash(&record.hash),
                    canonical_json(&Value::Object(map.clone()))
                );
                prop_assert_eq!(
                    crate::chain::record_hash(&record),
                    crate::chain::json_record_hash(&map).unwrap()
                );
            }
        }
    }
}
