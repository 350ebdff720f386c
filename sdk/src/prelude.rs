//! Everything a plugin needs: `use asyncore_sdk::prelude::*;`.

pub use crate::{Channel, ChannelId, Config, TimerId, Dispatcher, Plugin, export_plugin, log};
