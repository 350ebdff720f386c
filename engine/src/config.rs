//! Listener configuration values the engine reads itself (`idle_timeout`,
//! `max_connections`);
//! every other entry is the plugin's to interpret.

use std::collections::BTreeMap;

/// Listener configuration keys the daemon keeps for itself: they are never
/// handed to a plugin's `listen` or `resume`, so a plugin that refuses
/// unknown keys accepts a listener with an idle timeout. Plugins must not
/// use these names.
pub const RESERVED_KEYS: &[&str] = &["idle_timeout", "max_connections"];

/// A listener's configuration as its plugin sees it: without the
/// [`RESERVED_KEYS`].
pub(crate) fn plugin_config(config: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    config
        .iter()
        .filter(|(key, _)| !RESERVED_KEYS.contains(&key.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Parses a duration such as `30s`, `500ms`, `2m`, `1h`, or a bare number
/// of seconds.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    std::time::Duration::try_from_secs_f64(seconds).ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
        assert_eq!(parse_duration(""), None);
    }
}
