//! Plugin generations: loading a library again under the same name,
//! switching which generation new connections go to, draining and retiring
//! old ones.
//!
//! A listener names a plugin; its listening dispatcher belongs to one
//! generation. Making another generation current asks the new generation for
//! a listening dispatcher for every listener of the plugin (from the
//! listener's config) and swaps it in: the listening socket never closes, so
//! no connection is dropped. Channels keep the generation that created them.
//!
//! The table is bounded: a plugin's idle generations past the newest
//! [`STANDBY_KEPT`] are retired when another becomes current, and the
//! records of its retired generations past the newest [`RETIRED_KEPT`] are
//! forgotten once their library was released, so a daemon that reloads on
//! every deploy for months keeps a few records per plugin, not one per
//! reload.

use std::{
    collections::{BTreeMap, HashMap},
    ops::{Index, IndexMut},
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use super::{
    Core,
    channel::{Phase, ShutdownReason},
    timers::TimerKind,
};
use crate::{
    command::{ChannelKind, CommandError, GenerationInfo, GenerationState, PluginInfo},
    config::plugin_config,
    host_abi::{CallCtx, Dispatcher, Panicked},
    ids::{ChannelId, GenerationIndex, ListenerId, Slot},
    loader::{LoadedPlugin, Unloaded},
};

/// Idle generations of a plugin kept on standby for a rollback; older
/// idle ones are retired when another generation becomes current.
const STANDBY_KEPT: usize = 4;

/// Retired generations of a plugin whose records are kept (listed, and
/// answering `ActivatePlugin` with `GenerationRetired`); the records of
/// older retired ones are forgotten once their library was released.
const RETIRED_KEPT: usize = 8;

/// One generation of a plugin.
pub(super) struct Generation {
    pub(super) loaded: LoadedPlugin,
    /// The plugin's name, shared by every listing of its channels (a
    /// page of `ListChannels` copies no string on the loop).
    pub(super) name: Arc<str>,
    /// The number users see: 1, 2, ... per plugin name.
    pub(super) generation: u32,
    pub(super) retired: bool,
    /// Retired, and its library released (`unload_if_unused`): none of its
    /// code runs again, and no channel, listening listener or `current`
    /// names it any more.
    pub(super) released: bool,
    pub(super) panics: u64,
    pub(super) live_channels: u64,
}

/// The generations of every plugin, in load order: channels and listeners
/// refer to theirs by [`GenerationIndex`].
///
/// Indices grow with each load and are never reused, so the index of a
/// forgotten record names no other generation. A record is forgotten
/// ([`Core::forget_old_generations`]) only once it is retired and released,
/// so every index that a channel in the map, a listening listener or
/// `current` holds names a record, and indexing with it cannot fail. The
/// indices that may outlive their record, a stopped listener's and a drain
/// timer's, are looked up with [`get`](Generations::get).
#[derive(Default)]
pub(super) struct Generations {
    records: BTreeMap<GenerationIndex, Generation>,
    next_index: usize,
    /// Every plugin name ever loaded, in the order first loaded, with the
    /// highest generation number it was given: forgotten records included,
    /// so numbers keep increasing.
    names: Vec<(Arc<str>, u32)>,
    /// A generation was retired or released since the last
    /// [`Core::forget_old_generations`]: a record may be forgettable.
    forget_due: bool,
}

impl Generations {
    fn push(&mut self, generation: Generation) -> GenerationIndex {
        let index = GenerationIndex(self.next_index);
        self.next_index += 1;
        match self.names.iter_mut().find(|(name, _)| *name == generation.name) {
            Some((_, newest)) => *newest = (*newest).max(generation.generation),
            None => self.names.push((generation.name.clone(), generation.generation)),
        }
        self.records.insert(index, generation);
        index
    }

    /// The generation at `index`, unless its record was forgotten.
    pub(super) fn get(&self, index: GenerationIndex) -> Option<&Generation> {
        self.records.get(&index)
    }

    /// The highest generation number plugin `name` was ever given (0 for a
    /// name never loaded), whether or not its record is still kept.
    fn newest_number(&self, name: &str) -> u32 {
        self.names.iter().find(|(n, _)| **n == *name).map_or(0, |&(_, newest)| newest)
    }

    /// The generations of plugin `name` whose records are kept, oldest
    /// first.
    fn of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = GenerationIndex> + 'a {
        self.records.iter().filter(move |(_, g)| *g.name == *name).map(|(&index, _)| index)
    }

    /// Every plugin name with a kept record, in the order first loaded.
    fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|(name, _)| &**name).filter(|&name| self.of(name).next().is_some())
    }

    /// How many records are kept, of every plugin.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }
}

impl Index<GenerationIndex> for Generations {
    type Output = Generation;

    fn index(&self, index: GenerationIndex) -> &Generation {
        self.records.get(&index).expect("a generation that a channel, a listening listener or `current` names is kept")
    }
}

impl IndexMut<GenerationIndex> for Generations {
    fn index_mut(&mut self, index: GenerationIndex) -> &mut Generation {
        self.records
            .get_mut(&index)
            .expect("a generation that a channel, a listening listener or `current` names is kept")
    }
}

impl Core {
    pub(super) fn add_plugin(
        &mut self,
        plugin: LoadedPlugin,
        activate: bool,
        drain_timeout: Option<Duration>,
    ) -> Result<PluginInfo, CommandError> {
        self.add_plugin_as(plugin, activate, drain_timeout, None)
    }

    /// [`add_plugin`](Core::add_plugin), numbering the generation
    /// `requested` when given (a restore of saved state): it must be above
    /// every generation the plugin was given (forgotten ones included), and
    /// it becomes current only with `activate`, so that a plugin saved with
    /// no current generation is restored so.
    pub(super) fn add_plugin_as(
        &mut self,
        plugin: LoadedPlugin,
        activate: bool,
        drain_timeout: Option<Duration>,
        requested: Option<u32>,
    ) -> Result<PluginInfo, CommandError> {
        let name = plugin.name.clone();
        let newest = self.plugins.newest_number(&name);
        let generation = match requested {
            None => newest + 1,
            Some(generation) if generation > newest => generation,
            Some(generation) => {
                // Never handed to the engine: its library can go now.
                let _ = plugin.unload();
                return Err(CommandError::GenerationTaken { name, generation, newest });
            }
        };
        info!(
            plugin = %name,
            generation,
            version = %plugin.version,
            path = %plugin.path.display(),
            sha256 = %plugin.sha256,
            "plugin loaded"
        );
        let index = self.plugins.push(Generation {
            name: plugin.name.as_str().into(),
            loaded: plugin,
            generation,
            retired: false,
            released: false,
            panics: 0,
            live_channels: 0,
        });
        let activated = if activate || (requested.is_none() && !self.current.contains_key(&name)) {
            self.activate(index, drain_timeout)
        } else {
            Ok(())
        };
        self.forget_old_generations();
        activated?;
        Ok(self.plugin_info(&name))
    }

    pub(super) fn activate_plugin(
        &mut self,
        name: &str,
        generation: u32,
        drain_timeout: Option<Duration>,
    ) -> Result<PluginInfo, CommandError> {
        let index = self.generation_index(name, generation)?;
        if self.plugins[index].retired {
            return Err(CommandError::GenerationRetired { name: name.to_string(), generation });
        }
        let activated = self.activate(index, drain_timeout);
        self.forget_old_generations();
        activated?;
        Ok(self.plugin_info(name))
    }

    /// Makes generation `index` current. Every listener of the plugin gets a
    /// listening dispatcher of the new generation, or, if the generation
    /// refuses any listener's config, nothing changes at all.
    fn activate(&mut self, index: GenerationIndex, drain_timeout: Option<Duration>) -> Result<(), CommandError> {
        let name = self.plugins[index].loaded.name.clone();
        let entries = self.plugins[index].loaded.entries;
        let listeners: Vec<(ListenerId, ChannelId)> = self
            .listeners
            .values()
            .filter(|l| l.plugin_name == name && l.generation != index)
            .filter_map(|l| Some((l.id, l.channel?)))
            .collect();
        let mut fresh: Vec<(ListenerId, ChannelId, Dispatcher)> = Vec::with_capacity(listeners.len());
        for (listener_id, channel_id) in listeners {
            // A copy: no reference into the core while plugin code runs.
            let config = plugin_config(&self.listeners[&listener_id].config);
            // The listener's shared state (a cache, a room) goes with it,
            // if its listening dispatcher exports it and the new
            // generation resumes it.
            let state = self
                .channels
                .slot_of(channel_id)
                .and_then(|slot| self.call(slot, |d, ctx| d.export_state(ctx)).flatten());
            let made = match state.as_deref().and_then(|state| entries.resume(&mut CallCtx::detached(), &config, state))
            {
                Some(resumed) => resumed,
                None => {
                    if state.is_some() {
                        warn!(
                            plugin = %name,
                            listener = listener_id.0,
                            "the listener's state was exported, but generation {} does not resume state: it starts empty",
                            self.plugins[index].generation
                        );
                    }
                    entries.listen(&mut CallCtx::detached(), &config)
                }
            };
            match made {
                Ok(dispatcher) => fresh.push((listener_id, channel_id, dispatcher)),
                Err(message) => {
                    for (_, _, dispatcher) in fresh {
                        dispatcher.release();
                    }
                    return Err(CommandError::PluginRefused {
                        plugin: format!("{name}@{}", self.plugins[index].generation),
                        message: format!("listener {listener_id}: {message}"),
                    });
                }
            }
        }
        for (listener_id, channel_id, dispatcher) in fresh {
            if let Some(slot) = self.channels.slot_of(channel_id) {
                let ch = &mut self.channels[slot];
                if let Some(old) = ch.dispatcher.replace(dispatcher) {
                    old.release();
                }
                ch.generation = index;
                self.channels.mark_dirty(slot);
            } else {
                dispatcher.release();
            }
            if let Some(listener) = self.listeners.get_mut(&listener_id) {
                listener.generation = index;
                listener.generation_number = self.plugins[index].generation;
            }
        }
        let previous = self.current.insert(name.clone(), index);
        self.retire_old_standbys(&name, index);
        info!(plugin = %name, generation = self.plugins[index].generation, "generation is current");
        self.migrate(index);
        if let Some(timeout) = drain_timeout
            && previous.is_some_and(|p| p != index)
        {
            let at = self.now.max(Instant::now()).checked_add(timeout);
            self.timers.arm(at, None, TimerKind::DrainGenerations { keep: index });
        }
        Ok(())
    }

    /// Hands the idle channels of the plugin's other generations over to
    /// generation `index`, each with the state its dispatcher exports: to
    /// the new listening dispatcher of its listener (`import_channel`, so
    /// that it shares the listener's state), or else to the generation's
    /// `import_state`. Runs between callbacks (activation is a command). A
    /// channel whose dispatcher declines (the default), or that nobody
    /// takes, stays on its generation.
    fn migrate(&mut self, index: GenerationIndex) {
        let name = self.plugins[index].loaded.name.clone();
        let entries = self.plugins[index].loaded.entries;
        let slots = self.channel_slots(&name, |ch| {
            ch.kind != ChannelKind::Listening
                && ch.generation != index
                && ch.phase == Phase::Open
                && ch.dispatcher.is_some()
                && ch.shutdown.is_none()
        });
        let mut moved = 0u64;
        for slot in slots {
            // The listening channel of the channel's listener, if the new
            // generation serves it.
            let listener_slot = self
                .listeners
                .get(&self.channels[slot].listener)
                .and_then(|listener| listener.channel)
                .and_then(|id| self.channels.slot_of(id))
                .filter(|&ls| self.channels[ls].generation == index);
            if listener_slot.is_none() && !entries.imports_state() {
                continue;
            }
            let Some(state) = self.call(slot, |d, ctx| d.export_state(ctx)).flatten() else { continue };
            if !self.is_open(slot) {
                continue;
            }
            let mut imported = None;
            if let Some(listener_slot) = listener_slot
                && let Some(listening) = self.channels[listener_slot].dispatcher
            {
                let mut ctx = CallCtx::new(self, slot);
                let answer = listening.import_channel(&mut ctx, &state);
                let report = ctx.take_report();
                match answer {
                    Ok(dispatcher) => imported = dispatcher,
                    Err(Panicked) => self.poisoned(listener_slot, report),
                }
            }
            let imported = match imported {
                Some(dispatcher) => Ok(dispatcher),
                // The new generation's code may only report through a
                // context naming no channel.
                None if entries.imports_state() => entries.import_state(&mut CallCtx::detached(), &state),
                None => Err("its listener's new listening dispatcher did not take it".to_string()),
            };
            let ch = &mut self.channels[slot];
            let channel_id = ch.id;
            match imported {
                Ok(dispatcher) => {
                    let old_generation = ch.generation;
                    if let Some(old) = ch.dispatcher.replace(dispatcher) {
                        old.release();
                    }
                    ch.generation = index;
                    // Timers the old generation set carry its tokens: they
                    // do not follow the channel.
                    self.timers.cancel_calls_of(channel_id);
                    self.plugins[old_generation].live_channels -= 1;
                    self.unload_if_unused(old_generation);
                    self.plugins[index].live_channels += 1;
                    self.channels.mark_dirty(slot);
                    moved += 1;
                }
                Err(message) => {
                    warn!(plugin = %name, channel = channel_id.0, "state handover refused, staying on the old generation: {message}");
                }
            }
        }
        if moved > 0 {
            info!(plugin = %name, generation = self.plugins[index].generation, channels = moved, "channels handed over with their state");
        }
    }

    /// The drain timeout of an activation passed: close (gracefully) every
    /// channel of the plugin's other generations.
    pub(super) fn drain_generations(&mut self, keep: GenerationIndex) {
        // A forgotten generation was retired, so it is not current: its
        // activation no longer decides what drains.
        let Some(entry) = self.plugins.get(keep) else { return };
        let name = entry.loaded.name.clone();
        if self.current.get(&name) != Some(&keep) {
            // Another generation was made current since: its own
            // activation decides what drains.
            return;
        }
        let slots = self.channel_slots(&name, |ch| ch.kind != ChannelKind::Listening && ch.generation != keep);
        if !slots.is_empty() {
            info!(plugin = %name, channels = slots.len(), "drain timeout: closing channels of older generations");
        }
        for slot in slots {
            self.shut_down(slot, ShutdownReason::Reload);
        }
    }

    pub(super) fn unload_plugin(
        &mut self,
        name: &str,
        generation: Option<u32>,
        force: bool,
    ) -> Result<PluginInfo, CommandError> {
        let targets: Vec<GenerationIndex> = match generation {
            Some(generation) => vec![self.generation_index(name, generation)?],
            None => self.plugins.of(name).collect(),
        };
        if targets.is_empty() {
            return Err(CommandError::NoPlugin(name.to_string()));
        }
        let listeners: Vec<ListenerId> = self
            .listeners
            .values()
            .filter(|l| l.channel.is_some() && targets.contains(&l.generation))
            .map(|l| l.id)
            .collect();
        let channels: u64 = targets.iter().map(|&i| self.plugins[i].live_channels).sum();
        if (!listeners.is_empty() || channels > 0) && !force {
            let mut users = Vec::new();
            if !listeners.is_empty() {
                let ids: Vec<String> = listeners.iter().map(ListenerId::to_string).collect();
                users.push(format!("listener {}", ids.join(", ")));
            }
            if channels > 0 {
                users.push(format!("{channels} open channel{}", if channels == 1 { "" } else { "s" }));
            }
            let name = match generation {
                Some(generation) => format!("{name}@{generation}"),
                None => name.to_string(),
            };
            return Err(CommandError::PluginInUse { name, users: users.join(" and ") });
        }
        for &id in &listeners {
            warn!(plugin = %name, listener = id.0, "unload with force: stopping the listener");
            let _ = self.stop_listener(id, false);
        }
        for slot in self.channel_slots(name, |ch| targets.contains(&ch.generation)) {
            self.shut_down(slot, ShutdownReason::Unload);
        }
        for &index in &targets {
            if !self.plugins[index].retired {
                self.retire(index);
                info!(plugin = %name, generation = self.plugins[index].generation, "generation retired");
            }
            if self.current.get(name) == Some(&index) {
                self.current.remove(name);
            }
        }
        for &index in &targets {
            self.unload_if_unused(index);
        }
        self.forget_old_generations();
        Ok(self.plugin_info(name))
    }

    /// Retires the plugin's idle generations (no channel, no listener) past
    /// the newest [`STANDBY_KEPT`] other than `current`: they stay ready
    /// for a rollback, and a daemon that reloads on every deploy for months
    /// does not keep every build it ever loaded mapped.
    fn retire_old_standbys(&mut self, name: &str, current: GenerationIndex) {
        let idle: Vec<GenerationIndex> = self
            .plugins
            .of(name)
            .filter(|&index| {
                let entry = &self.plugins[index];
                index != current
                    && !entry.retired
                    && entry.live_channels == 0
                    && !self.listeners.values().any(|l| l.generation == index && l.channel.is_some())
            })
            .collect();
        // Oldest first: keep the newest STANDBY_KEPT.
        let excess = idle.len().saturating_sub(STANDBY_KEPT);
        for &index in &idle[..excess] {
            self.retire(index);
            info!(plugin = %name, generation = self.plugins[index].generation, "generation retired: more than {STANDBY_KEPT} idle generations");
            self.unload_if_unused(index);
        }
    }

    /// Marks generation `index` retired: never made current or called
    /// again once its channels are gone.
    fn retire(&mut self, index: GenerationIndex) {
        self.plugins[index].retired = true;
        // One more retired generation may push an older one's record past
        // the newest RETIRED_KEPT.
        self.plugins.forget_due = true;
    }

    /// Whether a channel or a listening dispatcher of generation `index` is
    /// left.
    fn in_use(&self, index: GenerationIndex) -> bool {
        self.plugins[index].live_channels > 0
            || self.listeners.values().any(|l| l.generation == index && l.channel.is_some())
    }

    /// Closes the library of a retired generation once nothing of it can
    /// run: no channel and no listening dispatcher of it is left (its
    /// vtables and code go with the image). A library glibc cannot unmap
    /// (a thread-local destructor of the plugin is pending) stays mapped,
    /// never called again; the log says which.
    pub(super) fn unload_if_unused(&mut self, index: GenerationIndex) {
        let entry = &self.plugins[index];
        if !entry.retired || entry.released || self.in_use(index) {
            return;
        }
        let entry = &mut self.plugins[index];
        // SAFETY: retired, it is never activated or called again; no
        // channel or listener of it is left, so no dispatcher, timer or
        // entry point of it can run.
        let outcome = unsafe { entry.loaded.release_image() };
        entry.released = true;
        if outcome != Unloaded::NoLibrary {
            info!(plugin = %entry.loaded.name, generation = entry.generation, "library of a retired generation: {outcome}");
        }
        self.plugins.forget_due = true;
    }

    /// Forgets the records of each plugin's retired generations past its
    /// newest [`RETIRED_KEPT`] retired ones, once their library was
    /// released: dropping the record frees what the load held (its
    /// `host_data` record only if the library was unmapped; see
    /// `LoadedPlugin`). A released generation is retired (not `current`)
    /// and nothing of it is in use, so only a stopped listener or a drain
    /// timer may still hold its index, and both look it up with
    /// [`Generations::get`].
    ///
    /// Called only where no [`GenerationIndex`] is held across it: at the
    /// end of a command that may retire a generation, and at the start of
    /// each pass for the libraries released as channels closed. Cheap when
    /// nothing was retired or released since the last call.
    pub(super) fn forget_old_generations(&mut self) {
        if !std::mem::take(&mut self.plugins.forget_due) {
            return;
        }
        let mut forgettable = Vec::new();
        for (name, _) in &self.plugins.names {
            let retired: Vec<GenerationIndex> = self.plugins.of(name).filter(|&i| self.plugins[i].retired).collect();
            // Oldest first: keep the newest RETIRED_KEPT.
            let excess = retired.len().saturating_sub(RETIRED_KEPT);
            forgettable
                .extend(retired[..excess].iter().copied().filter(|&i| self.plugins[i].released && !self.in_use(i)));
        }
        for index in forgettable {
            if let Some(entry) = self.plugins.records.remove(&index) {
                debug!(plugin = %entry.name, generation = entry.generation, "record of a retired generation forgotten");
            }
        }
    }

    /// Slots of the live channels of plugin `name` matching `filter`.
    fn channel_slots(&self, name: &str, filter: impl Fn(&super::channel::Channel) -> bool) -> Vec<Slot> {
        self.channels.slots_where(|ch| self.plugins[ch.generation].loaded.name == name && filter(ch))
    }

    fn generation_index(&self, name: &str, generation: u32) -> Result<GenerationIndex, CommandError> {
        let mut found = self.plugins.of(name).peekable();
        if found.peek().is_none() {
            return Err(CommandError::NoPlugin(name.to_string()));
        }
        found
            .find(|&i| self.plugins[i].generation == generation)
            .ok_or_else(|| CommandError::NoGeneration { name: name.to_string(), generation })
    }

    pub(super) fn list_plugins(&self) -> Vec<PluginInfo> {
        self.plugins.names().map(|name| self.plugin_info(name)).collect()
    }

    pub(super) fn plugin_info(&self, name: &str) -> PluginInfo {
        let current = self.current.get(name).copied();
        let mut listeners: HashMap<GenerationIndex, Vec<u64>> = HashMap::new();
        for listener in self.listeners.values().filter(|l| l.channel.is_some()) {
            listeners.entry(listener.generation).or_default().push(listener.id.0);
        }
        let generations = self
            .plugins
            .of(name)
            .map(|index| {
                let entry = &self.plugins[index];
                let state = if current == Some(index) {
                    GenerationState::Current
                } else if entry.retired {
                    GenerationState::Retired
                } else if entry.live_channels > 0 {
                    GenerationState::Draining
                } else {
                    GenerationState::Standby
                };
                GenerationInfo {
                    generation: entry.generation,
                    version: entry.loaded.version.clone(),
                    abi_version: entry.loaded.abi,
                    sdk_version: entry.loaded.sdk_version.clone(),
                    path: entry.loaded.path.display().to_string(),
                    sha256: entry.loaded.sha256.clone(),
                    loaded_at: entry.loaded.loaded_at,
                    state,
                    listener_ids: listeners.remove(&index).unwrap_or_default(),
                    live_channels: entry.live_channels,
                    panics: entry.panics,
                    metrics: entry.loaded.shared.snapshot(),
                }
            })
            .collect();
        PluginInfo {
            name: name.to_string(),
            current_generation: current.map_or(0, |i| self.plugins[i].generation),
            generations,
        }
    }
}
