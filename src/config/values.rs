//! Values with their own syntax in configuration files (durations, sizes, cron expressions,
//! time zones, globs), checked while the YAML is read so the reader attaches the location, and
//! the helpers that name a file, line and field in errors.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Result, anyhow};
use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_saphyr::Spanned;

/// Parses YAML into `T`, naming `file` in the error (the YAML reader adds line, column and field).
pub fn parse_yaml<T: for<'de> Deserialize<'de>>(text: &str, file: &str) -> Result<T> {
    serde_saphyr::from_str(text).map_err(|e| anyhow!("{file}: {e}"))
}

/// `file:line:column` of a value read from `file`.
pub fn at<T>(file: &Path, s: &Spanned<T>) -> String {
    format!("{}:{}:{}", file.display(), s.referenced.line(), s.referenced.column())
}

/// A duration written as `30s`, `5m`, `2h`, `1h 30m`, `500ms` or ISO 8601 (`PT2H`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d: jiff::SignedDuration =
            s.trim().parse().map_err(|e| format!("{s:?} is not a duration like 30s, 5m, 2h or 1h 30m ({e})"))?;
        if d.is_negative() {
            return Err(format!("{s:?}: a duration cannot be negative"));
        }
        Ok(Dur(d.unsigned_abs()))
    }
}

/// A byte count written as a number or with a unit: `512MiB`, `4GiB`, `2GB`, `1000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like 512MiB or 4GiB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            // Kubernetes spells the binary units Ki, Mi, Gi, Ti.
            "kib" | "ki" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" | "mi" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" | "gi" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" | "ti" => 1 << 40,
            u => return Err(format!("{s:?}: unknown size unit {u:?} (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")),
        };
        Ok(ByteSize((n * mult as f64) as u64))
    }
}

/// A cron expression (5 fields, or 6 with seconds).
#[derive(Clone, Debug)]
pub struct CronExpr {
    /// As written.
    pub text: String,
    /// The expression parsed.
    pub cron: croner::Cron,
}

impl FromStr for CronExpr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(s.trim())
            .map_err(|e| format!("{s:?} is not a cron expression like \"0 2 * * *\": {e}"))?;
        Ok(CronExpr { text: s.trim().into(), cron })
    }
}

/// An IANA time zone name (`Europe/Berlin`), resolved against the bundled tz database.
#[derive(Clone, Debug)]
pub struct TimeZoneName {
    /// As written.
    pub name: String,
    /// The zone from the bundled tz database.
    pub tz: jiff::tz::TimeZone,
}

impl FromStr for TimeZoneName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let tz = jiff::tz::TimeZone::get(s.trim()).map_err(|e| format!("{s:?} is not a known time zone: {e}"))?;
        Ok(TimeZoneName { name: s.trim().into(), tz })
    }
}

/// A glob over paths relative to an inbox (`**/*.pdf`), matched case-insensitively because
/// scanners and Windows shares write `.PDF` as often as `.pdf`.
#[derive(Clone, Debug)]
pub struct GlobPattern {
    /// As written.
    pub text: String,
    /// The pattern compiled.
    pub glob: globset::Glob,
}

impl FromStr for GlobPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let glob = globset::GlobBuilder::new(s)
            .case_insensitive(true)
            .literal_separator(false)
            .build()
            .map_err(|e| format!("{s:?} is not a glob pattern: {e}"))?;
        Ok(GlobPattern { text: s.into(), glob })
    }
}

macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str(stringify!($t))
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$t, E> {
                        s.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, n: u64) -> Result<$t, E> {
                        n.to_string().parse().map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, n: i64) -> Result<$t, E> {
                        n.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    )*};
}
deserialize_from_str!(Dur, ByteSize, CronExpr, TimeZoneName, GlobPattern);
