//! `Config`: the string key/values a listener was started with.

use std::{collections::BTreeMap, fmt::Display, str::FromStr};

use crate::ffi::KeyValue;

/// Configuration of one listener, as given to `StartListener`
/// (`asyncorectl listeners start ADDR PLUGIN -c key=value`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    entries: BTreeMap<String, String>,
}

impl Config {
    /// A configuration from key/value pairs, for tests.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Config {
        Config { entries: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    pub(crate) fn from_ffi(entries: &[KeyValue]) -> Config {
        Config::from_pairs(entries.iter().map(|kv| {
            // SAFETY: the host lends every entry for the duration of `listen`.
            unsafe { (kv.key.to_string_lossy(), kv.value.to_string_lossy()) }
        }))
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// The value of `key` parsed as `T`, or `default` when unset.
    ///
    /// # Errors
    ///
    /// A message naming the key, the value and the parse error, ready to be
    /// returned from [`Plugin::listen`](crate::Plugin::listen).
    pub fn parse_or<T>(&self, key: &str, default: T) -> Result<T, String>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|e| format!("config {key}: invalid value {value:?}: {e}")),
        }
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}
