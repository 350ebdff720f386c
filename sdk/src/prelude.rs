//! Everything a plugin needs: `use asyncore_sdk::prelude::*;`.

pub use std::mem::MaybeUninit;

pub use crate::{
    AsyncChat, Channel, ChannelId, Chat, ChatHandler, CloseReason, Config, Dispatcher, FileProducer, Plugin, Producer,
    SimpleProducer, Terminator, TimerId, export_plugin, log,
};
