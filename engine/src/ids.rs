//! Typed keys of the engine's tables (mio's `Token`), so that a slot of the
//! channel table, a channel id, a listener id, a timer id and the index of a
//! plugin generation cannot be passed one for another.
//!
//! They stop at the poll loop's edge: the public command and answer types
//! (and the C ABI) carry plain `u64` ids, converted where they come in and
//! go out.

use std::fmt;

/// Index of a channel in the loop's channel table, and its key with the
/// poller. Reused once its channel is gone, unlike a [`ChannelId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Slot(pub(crate) usize);

/// A channel's id: unique for the life of the engine, never reused, never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ChannelId(pub(crate) u64);

/// A listener's id: unique for the life of the engine, never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ListenerId(pub(crate) u64);

/// A timer's id, as `call_later` returns it to a plugin: never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct TimerId(pub(crate) u64);

/// Index of a plugin generation in the loop's table of generations (not the
/// generation number users see): one per load, never reused, so the index
/// of a generation whose record was forgotten names no other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GenerationIndex(pub(crate) usize);

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
