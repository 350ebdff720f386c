//! The listener's configuration: every key the plugin reads, its default,
//! and the durations (`10s`, `500ms`, `2m`) the timeouts are written in.
//!
//! Parsed once, when the listener starts, so that a typo is refused there
//! rather than found out by the first client.

use std::time::Duration;

use asyncore_sdk::Config;

/// Default of `max_header_bytes`.
const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default of `high_water`: the SDK's.
const DEFAULT_HIGH_WATER: usize = 256 * 1024;
/// Default of `head_timeout`: long enough for a client on a bad mobile
/// link to send a head of a few KiB, short enough that a slowloris
/// connection is gone before it costs much.
const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `keepalive_timeout`.
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// A message naming the key whose value is invalid.
    pub(crate) fn from_config(config: &Config) -> Result<Settings, String> {
        let max_header_bytes = config.parse_or("max_header_bytes", DEFAULT_MAX_HEADER_BYTES)?;
        let high_water = config.parse_or("high_water", DEFAULT_HIGH_WATER)?;
        if max_header_bytes == 0 {
            return Err("config max_header_bytes: must be at least 1".to_string());
        }
        if high_water == 0 {
            return Err("config high_water: must be at least 1".to_string());
        }
        let status_path = config.get("status_path").map(str::to_string);
        let is_path = |path: &str| path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic() && b != b'?');
        if let Some(path) = status_path.as_deref().filter(|path| !is_path(path)) {
            return Err(format!("config status_path: invalid value {path:?}: expected a path such as /status"));
        }
        let max_connections_per_ip = config.parse_or("max_connections_per_ip", 0usize)?;
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

/// The timeout under `key`: `default` when unset, `None` when `0`.
fn timeout(config: &Config, key: &str, default: Duration) -> Result<Option<Duration>, String> {
    let duration = match config.get(key) {
        None => default,
        Some(value) => parse_duration(value).map_err(|e| format!("config {key}: invalid value {value:?}: {e}"))?,
    };
    Ok((!duration.is_zero()).then_some(duration))
}

/// Parses a whole number followed by a unit, `ms`, `s`, `m` or `h`:
/// `500ms`, `10s`, `2m`. A bare `0` is zero too (whatever the unit, zero
/// is zero).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err("expected a duration such as 10s, 500ms or 2m".to_string());
    }
    let n: u64 = digits.parse().map_err(|e| format!("{e}"))?;
    let ms_per_unit = match unit {
        "" if n == 0 => 0,
        "ms" => 1,
        "s" => 1000,
        "m" => 60 * 1000,
        "h" => 60 * 60 * 1000,
        "" => return Err("a duration needs a unit: ms, s, m or h".to_string()),
        _ => return Err(format!("unknown unit {unit:?}: expected ms, s, m or h")),
    };
    let ms = n.checked_mul(ms_per_unit).ok_or_else(|| "too long".to_string())?;
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_a_number_and_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "1.5s", "-1s", " 1s", "1s ", "1 s", "10sec", "1d", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("18446744073709551615h").unwrap_err().contains("too long"));
    }

    #[test]
    fn defaults_protect_and_zero_turns_a_limit_off() {
        let settings = Settings::from_config(&Config::default()).unwrap();
        assert_eq!(settings.head_timeout, Some(Duration::from_secs(10)));
        assert_eq!(settings.keepalive_timeout, Some(Duration::from_secs(30)));
        assert_eq!(settings.max_connections_per_ip, None);
        assert_eq!(settings.status_path, None);

        let config = Config::from_pairs([
            ("head_timeout", "0"),
            ("keepalive_timeout", "250ms"),
            ("max_connections_per_ip", "8"),
            ("status_path", "/status"),
        ]);
        let settings = Settings::from_config(&config).unwrap();
        assert_eq!(settings.head_timeout, None);
        assert_eq!(settings.keepalive_timeout, Some(Duration::from_millis(250)));
        assert_eq!(settings.max_connections_per_ip, Some(8));
        assert_eq!(settings.status_path.as_deref(), Some("/status"));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            ("head_timeout", "10"),
            ("keepalive_timeout", "soon"),
            ("max_connections_per_ip", "-1"),
            ("status_path", "status"),
            ("status_path", "/a b"),
            ("max_header_bytes", "0"),
            ("high_water", "0"),
        ] {
            let error = Settings::from_config(&Config::from_pairs([(key, value)])).unwrap_err();
            assert!(error.starts_with(&format!("config {key}: ")), "{error}");
        }
    }
}
