//! What the host keeps for each loaded plugin that plugin code may reach at
//! any time, not only during a callback: its name (for its log records) and
//! the metrics it defines (`asyncore_sdk::metrics`). The plugin gets a
//! pointer to it as `init`'s `host_data`, so it must live as long as the
//! plugin's code may run: its [`LoadedPlugin`](crate::loader::LoadedPlugin)
//! owns it and frees it only once the library was unmapped (the loader says
//! when).
//!
//! Metrics are plain atomics in a fixed table: updating one on the hot path
//! is one relaxed atomic add, and the loop reads them for `ListPlugins` and
//! `/metrics` without a lock.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicI64, AtomicUsize, Ordering},
};

use crate::command::{MetricKind, PluginMetric};

/// Metrics one plugin generation may define.
pub(crate) const MAX_METRICS: usize = 64;

/// A metric's help text is cut to this many bytes, so that one plugin's
/// entry in `ListPlugins` stays far below a reply's 4 MiB.
pub(crate) const MAX_HELP_BYTES: usize = 1024;

/// A plugin's `host_data`.
pub(crate) struct PluginShared {
    pub(crate) name: Box<str>,
    metrics: [MetricSlot; MAX_METRICS],
    /// Slots taken so far (each is defined right after it is taken).
    taken: AtomicUsize,
}

#[derive(Default)]
struct MetricSlot {
    def: OnceLock<MetricDef>,
    value: AtomicI64,
}

struct MetricDef {
    name: String,
    help: String,
    kind: MetricKind,
}

/// Why a metric could not be defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DefineError {
    /// Not a Prometheus metric name, or defined before as another kind.
    Invalid,
    /// [`MAX_METRICS`] are defined already.
    Full,
}

impl PluginShared {
    /// A new record for plugin `name`. It is shared (an [`Arc`]) because
    /// plugin code reaches it through a raw pointer while the engine lists
    /// its metrics: only shared references to it are ever made, and all
    /// that changes in it is atomic.
    pub(crate) fn new(name: &str) -> Arc<PluginShared> {
        Arc::new(PluginShared {
            name: name.into(),
            metrics: std::array::from_fn(|_| MetricSlot::default()),
            taken: AtomicUsize::new(0),
        })
    }

    /// Defines a metric, or finds the one defined before under that name
    /// (a plugin's `listen` runs once per listener). Returns its id.
    pub(crate) fn define(&self, kind: MetricKind, name: &str, help: &str) -> Result<usize, DefineError> {
        if !is_metric_name(name) {
            return Err(DefineError::Invalid);
        }
        let taken = self.taken.load(Ordering::Acquire).min(MAX_METRICS);
        for (id, slot) in self.metrics[..taken].iter().enumerate() {
            if let Some(def) = slot.def.get()
                && def.name == name
            {
                return if def.kind == kind { Ok(id) } else { Err(DefineError::Invalid) };
            }
        }
        let id = self.taken.fetch_add(1, Ordering::AcqRel);
        let Some(slot) = self.metrics.get(id) else {
            self.taken.store(MAX_METRICS, Ordering::Release);
            return Err(DefineError::Full);
        };
        let help = help.get(..help.floor_char_boundary(MAX_HELP_BYTES)).unwrap_or_default();
        let _ = slot.def.set(MetricDef { name: name.to_owned(), help: help.to_owned(), kind });
        Ok(id)
    }

    /// Adds `delta` to metric `id` (a counter only goes up: a negative
    /// delta is ignored for it).
    pub(crate) fn add(&self, id: u64, delta: i64) {
        if let Some(slot) = self.slot(id) {
            let counter = slot.def.get().is_some_and(|def| def.kind == MetricKind::Counter);
            if !(counter && delta < 0) {
                slot.value.fetch_add(delta, Ordering::Relaxed);
            }
        }
    }

    /// Sets gauge `id` to `value`.
    pub(crate) fn set(&self, id: u64, value: i64) {
        if let Some(slot) = self.slot(id).filter(|slot| slot.def.get().is_some_and(|d| d.kind == MetricKind::Gauge)) {
            slot.value.store(value, Ordering::Relaxed);
        }
    }

    fn slot(&self, id: u64) -> Option<&MetricSlot> {
        self.metrics.get(usize::try_from(id).ok()?)
    }

    /// Every defined metric with its value now.
    pub(crate) fn snapshot(&self) -> Vec<PluginMetric> {
        let taken = self.taken.load(Ordering::Acquire).min(MAX_METRICS);
        self.metrics[..taken]
            .iter()
            .filter_map(|slot| {
                let def = slot.def.get()?;
                Some(PluginMetric {
                    name: def.name.clone(),
                    help: def.help.clone(),
                    kind: def.kind,
                    value: slot.value.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, at most 128 bytes: Prometheus's rule.
fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 128
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_defined_once_by_name_and_counted() {
        let shared = PluginShared::new("p");
        let hits = shared.define(MetricKind::Counter, "hits_total", "Hits.").unwrap();
        assert_eq!(shared.define(MetricKind::Counter, "hits_total", "Hits again.").unwrap(), hits);
        assert_eq!(shared.define(MetricKind::Gauge, "hits_total", "x"), Err(DefineError::Invalid));
        assert_eq!(shared.define(MetricKind::Gauge, "9lives", "x"), Err(DefineError::Invalid));
        let open = shared.define(MetricKind::Gauge, "open", "Open things.").unwrap();
        shared.add(hits as u64, 3);
        shared.add(hits as u64, -1);
        shared.set(open as u64, 7);
        shared.set(hits as u64, 100);
        shared.add(99, 1);
        let values: Vec<(String, i64)> = shared.snapshot().into_iter().map(|m| (m.name, m.value)).collect();
        assert_eq!(values, [("hits_total".to_string(), 3), ("open".to_string(), 7)]);
    }

    #[test]
    fn the_table_is_bounded() {
        let shared = PluginShared::new("p");
        for n in 0..MAX_METRICS {
            shared.define(MetricKind::Counter, &format!("m{n}"), "").unwrap();
        }
        assert_eq!(shared.define(MetricKind::Counter, "one_more", ""), Err(DefineError::Full));
        assert_eq!(shared.snapshot().len(), MAX_METRICS);
    }

    #[test]
    fn long_names_are_refused_and_long_help_is_cut_at_a_character() {
        let shared = PluginShared::new("p");
        assert_eq!(shared.define(MetricKind::Counter, &"n".repeat(129), ""), Err(DefineError::Invalid));
        shared.define(MetricKind::Counter, &"n".repeat(128), &"é".repeat(1000)).unwrap();
        let help = &shared.snapshot()[0].help;
        assert_eq!((help.len(), help.chars().count()), (MAX_HELP_BYTES, MAX_HELP_BYTES / 2));
        shared.define(MetricKind::Counter, "odd", &format!("x{}", "é".repeat(1000))).unwrap();
        assert_eq!(shared.snapshot()[1].help.len(), MAX_HELP_BYTES - 1, "not in the middle of a character");
    }
}
