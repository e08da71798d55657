//! Durations as written in the configuration file: a whole number followed by
//! a unit, optionally repeated (`30s`, `10m`, `8h`, `1h30m`, `7d`).
//!
//! Units: `ms`, `s`, `m`, `h`, `d`. No spaces, no fractions, no sign. The total
//! must fit in a `u64` of milliseconds; anything else is a parse error, never a
//! silent clamp.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// A configured span of time, kept in whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration {
    millis: u64,
}

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {why} (expected e.g. \"30s\", \"10m\", \"8h\", \"1h30m\")")]
pub struct DurationError {
    input: String,
    why: &'static str,
}

impl Duration {
    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self { millis }
    }

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self {
            millis: secs.saturating_mul(1000),
        }
    }

    /// The duration in whole milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    /// The duration in whole seconds, rounded down.
    pub const fn as_secs(self) -> u64 {
        self.millis / 1000
    }

    /// The equivalent `std::time::Duration`.
    pub const fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why| DurationError {
            input: input.chars().take(64).collect(),
            why,
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        let mut total: u64 = 0;
        let mut rest = input;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err(match rest.bytes().next() {
                    Some(b'-' | b'+') => "no sign allowed",
                    Some(b) if b.is_ascii_whitespace() => "no spaces allowed",
                    _ => "expected a number",
                }));
            }
            let (number, tail) = rest.split_at(digits);
            let value: u64 = number.parse().map_err(|_| err("number too large"))?;
            match tail.bytes().next() {
                Some(b'.' | b',') => {
                    return Err(err("no fractions: use a smaller unit (90m, not 1.5h)"));
                }
                Some(b) if b.is_ascii_whitespace() => return Err(err("no spaces allowed")),
                _ => {}
            }
            let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
            let (unit, tail) = tail.split_at(unit_len);
            let scale: u64 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "" => return Err(err("missing unit")),
                _ => return Err(err("unknown unit")),
            };
            let part = value.checked_mul(scale).ok_or_else(|| err("too large"))?;
            total = total.checked_add(part).ok_or_else(|| err("too large"))?;
            rest = tail;
        }
        Ok(Self { millis: total })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 5] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
            (1, "ms"),
        ];
        if self.millis == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.millis;
        for (scale, unit) in UNITS {
            if rest >= scale {
                write!(f, "{}{unit}", rest / scale)?;
                rest %= scale;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        let ms = |s: &str| s.parse::<Duration>().map(Duration::as_millis);
        assert_eq!(ms("30s"), Ok(30_000));
        assert_eq!(ms("10m"), Ok(600_000));
        assert_eq!(ms("8h"), Ok(28_800_000));
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert_eq!(ms("250ms"), Ok(250));
        assert_eq!(ms("7d"), Ok(604_800_000));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "10",
            "m",
            "10 m",
            "-5s",
            "1.5h",
            "10x",
            "10mm",
            "99999999999999999999s",
            "18446744073709551615d",
        ] {
            assert!(
                bad.parse::<Duration>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["30s", "10m", "8h", "1h30m", "250ms", "1d2h3m4s5ms"] {
            let d: Duration = text.parse().unwrap_or_default();
            assert_eq!(d.to_string(), text);
        }
    }
}
