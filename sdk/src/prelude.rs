//! Everything a plugin needs: `use asyncore_sdk::prelude::*;`.

pub use crate::{Channel, ChannelId, Config, Dispatcher, Plugin, export_plugin, log};
