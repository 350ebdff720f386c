//! The listener's configuration: every key the plugin reads, its default,
//! its allowed range, and the durations (`10s`, `500ms`, `2m`) the timeouts
//! are written in.
//!
//! Parsed once, when the listener starts, so that a typo is refused there
//! rather than found out by the first client. Every number has a range, and
//! a value outside it is refused naming the key and the range: a timeout
//! of years is no limit in all but name (and one past what `Instant`
//! holds would make the deadline arithmetic fail, which arms no timer at
//! all), and a head or a buffer of gigabytes is a typo, not a setting.
//!
//! | key | default | allowed |
//! | --- | --- | --- |
//! | `max_header_bytes` | 16384 | 64 to 1048576 (1 MiB) |
//! | `high_water` | 262144 | 1024 to 67108864 (64 MiB) |
//! | `head_timeout` | `10s` | `0` (no limit), or `100ms` to `1h` |
//! | `keepalive_timeout` | `30s` | `0` (no limit), or `100ms` to `1h` |
//! | `max_connections_per_ip` | `0` (no limit) | `0`, or 1 to 1000000 |
//! | `status_path` | none | a path: `/` then printable ASCII, no `?` |

use std::{ops::RangeInclusive, time::Duration};

use asyncore_sdk::Config;

/// Default of `max_header_bytes`.
const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// The range of `max_header_bytes`: at least room for a short request
/// (`GET / HTTP/1.1`, a `Host` and the empty line are 27 bytes); at most
/// 1 MiB, 64 times the default and more than any client sends, since each
/// slow connection may hold that much.
const MAX_HEADER_BYTES: RangeInclusive<usize> = 64..=1024 * 1024;
/// Default of `high_water`: the SDK's.
const DEFAULT_HIGH_WATER: usize = 256 * 1024;
/// The range of `high_water`: under 1 KiB a connection stops reading after
/// every response head; over 64 MiB each slow reader may cost that much.
const HIGH_WATER: RangeInclusive<usize> = 1024..=64 * 1024 * 1024;
/// Default of `head_timeout`: long enough for a client on a bad mobile
/// link to send a head of a few KiB, short enough that a slowloris
/// connection is gone before it costs much.
const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `keepalive_timeout`.
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// The range of both timeouts when they are not `0` (off): under 100 ms an
/// ordinary client on a real network is cut off; over an hour a timeout
/// protects next to nothing.
const TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(100)..=Duration::from_secs(60 * 60);
/// The range of `max_connections_per_ip` when it is not `0` (off).
const MAX_CONNECTIONS_PER_IP: RangeInclusive<usize> = 1..=1_000_000;

/// One listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Most bytes of one request head.
    pub(crate) max_header_bytes: usize,
    /// Output waiting for a slow reader before the connection stops
    /// reading.
    pub(crate) high_water: usize,
    /// Time allowed for a request head, from its first byte (from accept
    /// for the first request); `None` for no limit.
    pub(crate) head_timeout: Option<Duration>,
    /// Time a kept-alive connection may wait for its next request once
    /// every response was sent; `None` for no limit.
    pub(crate) keepalive_timeout: Option<Duration>,
    /// Open connections allowed from one peer address; `None` for no
    /// limit.
    pub(crate) max_connections_per_ip: Option<usize>,
    /// Where the listener's counters are served, if anywhere.
    pub(crate) status_path: Option<String>,
}

impl Settings {
    /// The settings of `config`, with the defaults for what it leaves out.
    ///
    /// # Errors
    ///
    /// A message naming the key whose value is invalid and, for a value
    /// out of its range, the range.
    pub(crate) fn from_config(config: &Config) -> Result<Settings, String> {
        let max_header_bytes = size(config, "max_header_bytes", DEFAULT_MAX_HEADER_BYTES, MAX_HEADER_BYTES)?;
        let high_water = size(config, "high_water", DEFAULT_HIGH_WATER, HIGH_WATER)?;
        let status_path = config.get("status_path").map(str::to_string);
        let is_path = |path: &str| path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic() && b != b'?');
        if let Some(path) = status_path.as_deref().filter(|path| !is_path(path)) {
            return Err(format!("config status_path: invalid value {path:?}: expected a path such as /status"));
        }
        let max_connections_per_ip = config.parse_or("max_connections_per_ip", 0usize)?;
        if max_connections_per_ip != 0 && !MAX_CONNECTIONS_PER_IP.contains(&max_connections_per_ip) {
            return Err(out_of_range(
                "max_connections_per_ip",
                config.get("max_connections_per_ip").unwrap_or_default(),
                &format!("0 (no limit) or {} to {}", MAX_CONNECTIONS_PER_IP.start(), MAX_CONNECTIONS_PER_IP.end()),
            ));
        }
        Ok(Settings {
            max_header_bytes,
            high_water,
            head_timeout: timeout(config, "head_timeout", DEFAULT_HEAD_TIMEOUT)?,
            keepalive_timeout: timeout(config, "keepalive_timeout", DEFAULT_KEEPALIVE_TIMEOUT)?,
            max_connections_per_ip: (max_connections_per_ip > 0).then_some(max_connections_per_ip),
            status_path,
        })
    }
}

/// The error of a value outside its key's range.
fn out_of_range(key: &str, value: &str, allowed: &str) -> String {
    format!("config {key}: invalid value {value:?}: out of range: expected {allowed}")
}

/// The byte count under `key`: `default` when unset; refused outside
/// `range`.
fn size(config: &Config, key: &str, default: usize, range: RangeInclusive<usize>) -> Result<usize, String> {
    let n = config.parse_or(key, default)?;
    if !range.contains(&n) {
        return Err(out_of_range(
            key,
            config.get(key).unwrap_or_default(),
            &format!("{} to {}", range.start(), range.end()),
        ));
    }
    Ok(n)
}

/// The timeout under `key`: `default` when unset, `None` when `0`; refused
/// outside [`TIMEOUT`] otherwise.
fn timeout(config: &Config, key: &str, default: Duration) -> Result<Option<Duration>, String> {
    let Some(value) = config.get(key) else { return Ok(Some(default)) };
    let allowed = || format!("0 (no limit) or {} to {}", show(*TIMEOUT.start()), show(*TIMEOUT.end()));
    let duration = parse_duration(value).map_err(|e| match e {
        DurationError::TooLong => out_of_range(key, value, &allowed()),
        DurationError::Invalid(e) => format!("config {key}: invalid value {value:?}: {e}"),
    })?;
    if duration.is_zero() {
        return Ok(None);
    }
    if !TIMEOUT.contains(&duration) {
        return Err(out_of_range(key, value, &allowed()));
    }
    Ok(Some(duration))
}

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DurationError {
    /// Not a duration at all: the message says what was expected.
    Invalid(String),
    /// A duration, but more milliseconds than 64 bits hold.
    TooLong,
}

/// Parses a whole number followed by a unit, `ms`, `s`, `m` or `h`:
/// `500ms`, `10s`, `2m`. A bare `0` is zero too (whatever the unit, zero
/// is zero).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let invalid = |message: &str| DurationError::Invalid(message.to_string());
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid("expected a duration such as 10s, 500ms or 2m"));
    }
    let ms_per_unit = match unit {
        "" if digits.bytes().all(|b| b == b'0') => 0,
        "ms" => 1,
        "s" => 1000,
        "m" => 60 * 1000,
        "h" => 60 * 60 * 1000,
        "" => return Err(invalid("a duration needs a unit: ms, s, m or h")),
        _ => return Err(DurationError::Invalid(format!("unknown unit {unit:?}: expected ms, s, m or h"))),
    };
    // All digits: the only way to fail is too many of them.
    let n: u64 = digits.parse().map_err(|_| DurationError::TooLong)?;
    let ms = n.checked_mul(ms_per_unit).ok_or(DurationError::TooLong)?;
    Ok(Duration::from_millis(ms))
}

/// A whole number of milliseconds as the config writes it: in the largest
/// unit that divides it (`100ms`, `10s`, `2m`, `1h`).
fn show(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms == 0 {
        return "0".to_string();
    }
    for (unit, per_unit) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms / per_unit * per_unit == ms {
            return format!("{}{unit}", ms / per_unit);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, String> {
        Settings::from_config(&Config::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn durations_are_a_number_and_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("00"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "1.5s", "-1s", " 1s", "1s ", "1 s", "10sec", "1d"] {
            assert!(matches!(parse_duration(bad), Err(DurationError::Invalid(_))), "{bad:?}");
        }
        for too_long in ["18446744073709551615h", "99999999999999999999h", "99999999999999999999ms"] {
            assert_eq!(parse_duration(too_long), Err(DurationError::TooLong), "{too_long:?}");
        }
        // The largest that fits: parsed, and left for the range to refuse.
        assert_eq!(parse_duration("18446744073709551615ms"), Ok(Duration::from_millis(u64::MAX)));
    }

    #[test]
    fn durations_are_shown_in_their_largest_whole_unit() {
        assert_eq!(show(Duration::ZERO), "0");
        assert_eq!(show(Duration::from_millis(100)), "100ms");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(10)), "10s");
        assert_eq!(show(Duration::from_secs(90)), "90s");
        assert_eq!(show(Duration::from_secs(120)), "2m");
        assert_eq!(show(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn defaults_protect_and_zero_turns_a_limit_off() {
        let defaults = Settings::from_config(&Config::default()).unwrap();
        assert_eq!(defaults.max_header_bytes, 16 * 1024);
        assert_eq!(defaults.high_water, 256 * 1024);
        assert_eq!(defaults.head_timeout, Some(Duration::from_secs(10)));
        assert_eq!(defaults.keepalive_timeout, Some(Duration::from_secs(30)));
        assert_eq!(defaults.max_connections_per_ip, None);
        assert_eq!(defaults.status_path, None);

        let set = settings(&[
            ("head_timeout", "0"),
            ("keepalive_timeout", "250ms"),
            ("max_connections_per_ip", "8"),
            ("status_path", "/status"),
        ])
        .unwrap();
        assert_eq!(set.head_timeout, None);
        assert_eq!(set.keepalive_timeout, Some(Duration::from_millis(250)));
        assert_eq!(set.max_connections_per_ip, Some(8));
        assert_eq!(set.status_path.as_deref(), Some("/status"));

        let off = settings(&[("head_timeout", "0s"), ("keepalive_timeout", "0ms"), ("max_connections_per_ip", "0")]);
        let off = off.unwrap();
        assert_eq!((off.head_timeout, off.keepalive_timeout, off.max_connections_per_ip), (None, None, None));
    }

    #[test]
    fn the_ends_of_each_range_are_allowed() {
        let low = settings(&[
            ("max_header_bytes", "64"),
            ("high_water", "1024"),
            ("head_timeout", "100ms"),
            ("keepalive_timeout", "100ms"),
            ("max_connections_per_ip", "1"),
        ])
        .unwrap();
        assert_eq!((low.max_header_bytes, low.high_water), (64, 1024));
        assert_eq!(low.head_timeout, Some(Duration::from_millis(100)));
        assert_eq!(low.keepalive_timeout, Some(Duration::from_millis(100)));
        assert_eq!(low.max_connections_per_ip, Some(1));

        let high = settings(&[
            ("max_header_bytes", "1048576"),
            ("high_water", "67108864"),
            ("head_timeout", "1h"),
            ("keepalive_timeout", "60m"),
            ("max_connections_per_ip", "1000000"),
        ])
        .unwrap();
        assert_eq!((high.max_header_bytes, high.high_water), (1 << 20, 64 << 20));
        assert_eq!(high.head_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(high.keepalive_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(high.max_connections_per_ip, Some(1_000_000));
    }

    #[test]
    fn values_out_of_range_are_refused_naming_the_key_and_the_range() {
        let timeouts = "expected 0 (no limit) or 100ms to 1h";
        let cases = [
            ("head_timeout", "3601s", timeouts),
            ("head_timeout", "99ms", timeouts),
            ("head_timeout", "1000000h", timeouts),
            // The longest 64 bits of milliseconds hold (584 million years),
            // and longer still.
            ("head_timeout", "18446744073709551615ms", timeouts),
            ("head_timeout", "18446744073709551615h", timeouts),
            ("keepalive_timeout", "2h", timeouts),
            ("keepalive_timeout", "1ms", timeouts),
            ("keepalive_timeout", "99999999999999999999999s", timeouts),
            ("max_header_bytes", "0", "expected 64 to 1048576"),
            ("max_header_bytes", "63", "expected 64 to 1048576"),
            ("max_header_bytes", "1048577", "expected 64 to 1048576"),
            ("high_water", "0", "expected 1024 to 67108864"),
            ("high_water", "1023", "expected 1024 to 67108864"),
            ("high_water", "67108865", "expected 1024 to 67108864"),
            ("max_connections_per_ip", "1000001", "expected 0 (no limit) or 1 to 1000000"),
        ];
        for (key, value, allowed) in cases {
            let error = settings(&[(key, value)]).unwrap_err();
            assert_eq!(error, format!("config {key}: invalid value {value:?}: out of range: {allowed}"));
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            ("head_timeout", "10"),
            ("keepalive_timeout", "soon"),
            ("max_connections_per_ip", "-1"),
            ("max_connections_per_ip", "99999999999999999999999"),
            ("status_path", "status"),
            ("status_path", "/a b"),
            ("max_header_bytes", "0"),
            ("max_header_bytes", "-1"),
            ("high_water", "0"),
            ("high_water", "lots"),
        ] {
            let error = settings(&[(key, value)]).unwrap_err();
            assert!(error.starts_with(&format!("config {key}: ")), "{error}");
        }
    }
}
