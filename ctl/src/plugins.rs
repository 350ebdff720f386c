//! `asyncorectl plugins`: list, load, reload, activate and unload plugin
//! generations, and the one-line summaries of what each switch did. The
//! `reload --watch` loop lives in [`watch`]; `plugin new`, which needs no
//! daemon, in [`scaffold`].

mod scaffold;
mod watch;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use asyncore_proto::v1;
use asyncore_proto::v1::plugins_client::PluginsClient;
use serde_json::{Value, json};

use crate::connection::{Channel, ControlTarget};
use crate::flags::{OutputFormat, PluginsCommand};
use crate::pages;
use crate::render::{plugin_json, plugins_table, print_json, print_text};

pub(crate) use scaffold::create as new_crate;

/// Makes the command's library paths absolute, before connecting so that a
/// bad path is reported even when the daemon is down. The daemon resolves
/// relative paths against its own working directory, which is not ours.
pub(crate) fn resolve_paths(command: PluginsCommand) -> anyhow::Result<PluginsCommand> {
    Ok(match command {
        PluginsCommand::Load { path, activate } => PluginsCommand::Load { path: absolute_path(&path)?, activate },
        PluginsCommand::Reload(mut args) => {
            args.path = args.path.as_deref().map(absolute_path).transpose()?;
            PluginsCommand::Reload(args)
        }
        command => command,
    })
}

pub(crate) async fn run(
    channel: Channel,
    command: PluginsCommand,
    format: OutputFormat,
    target: &ControlTarget,
) -> anyhow::Result<()> {
    let mut client = PluginsClient::new(channel);
    let (plugin, summary) = match command {
        PluginsCommand::Ls => {
            let plugins = list_all_plugins(&mut client).await?;
            return match format {
                OutputFormat::Json => {
                    let items: Vec<Value> = plugins.iter().map(plugin_json).collect();
                    print_json(&json!({ "plugins": items }))
                }
                OutputFormat::Table => print_text(&plugins_table(&plugins)),
            };
        }
        PluginsCommand::Load { path, activate } => {
            // The name is only known once the daemon has opened the library,
            // so remember every plugin's current generation for the summary.
            let before = list_all_plugins(&mut client).await?;
            // `resolve_paths` has already made the path absolute.
            let request = v1::LoadPluginRequest { path: path_text(&path)?, activate };
            let plugin = client.load_plugin(request).await?.into_inner();
            let previous = before.iter().find(|known| known.name == plugin.name).map(|known| known.current_generation);
            let summary = load_summary(&plugin, previous.unwrap_or(0));
            (plugin, summary)
        }
        PluginsCommand::Reload(args) if args.watch => {
            return watch::watch_and_reload(&mut client, args, format, target).await;
        }
        PluginsCommand::Reload(args) => {
            let previous = current_generation(&mut client, &args.name).await?;
            let request = v1::ReloadPluginRequest {
                name: args.name,
                path: args.path.as_deref().map(path_text).transpose()?.unwrap_or_default(),
                drain_timeout_ms: args.drain_timeout.unwrap_or(0),
            };
            let plugin = client.reload_plugin(request).await?.into_inner();
            let summary = switch_summary(&plugin.name, plugin.current_generation, generation_number(previous.as_ref()));
            (plugin, summary)
        }
        PluginsCommand::Activate { name, generation, drain_timeout } => {
            let previous = current_generation(&mut client, &name).await?;
            let request = v1::ActivatePluginRequest { name, generation, drain_timeout_ms: drain_timeout.unwrap_or(0) };
            let plugin = client.activate_plugin(request).await?.into_inner();
            let summary = switch_summary(&plugin.name, plugin.current_generation, generation_number(previous.as_ref()));
            (plugin, summary)
        }
        PluginsCommand::Unload { name, generation, force } => {
            let plugin = client.unload_plugin(v1::UnloadPluginRequest { name, generation, force }).await?.into_inner();
            let summary = match generation {
                Some(generation) => format!("{}@{generation} is retired", plugin.name),
                None => format!("{} is unloaded: every generation is retired", plugin.name),
            };
            (plugin, summary)
        }
        // `main` runs it without connecting; reaching this is a bug there.
        PluginsCommand::New(_) => unreachable!("plugin new needs no daemon"),
    };
    match format {
        OutputFormat::Json => print_json(&plugin_json(&plugin)),
        OutputFormat::Table => print_text(&format!("{summary}\n")),
    }
}

/// Every plugin, in name order.
async fn list_all_plugins(client: &mut PluginsClient<Channel>) -> anyhow::Result<Vec<v1::Plugin>> {
    pages::all("plugins", |page_token| {
        let mut client = client.clone();
        // Zero lets the daemon use its default page size.
        let request = v1::ListPluginsRequest { page_size: 0, page_token, name: String::new() };
        async move {
            let page = client.list_plugins(request).await?.into_inner();
            Ok((page.plugins, page.next_page_token))
        }
    })
    .await
}

/// Plugin `name` from `ListPlugins`, or NOT_FOUND in the daemon's words.
async fn find_plugin(client: &mut PluginsClient<Channel>, name: &str) -> Result<v1::Plugin, tonic::Status> {
    let request = v1::ListPluginsRequest { name: name.to_string(), ..v1::ListPluginsRequest::default() };
    let plugins = client.list_plugins(request).await?.into_inner().plugins;
    plugins
        .into_iter()
        .find(|plugin| plugin.name == name)
        .ok_or_else(|| tonic::Status::not_found(format!("no plugin named {name:?} is loaded")))
}

/// The current generation of plugin `name`; `None` when it is not loaded or
/// has none, which the call that follows reports in the daemon's words.
async fn current_generation(
    client: &mut PluginsClient<Channel>,
    name: &str,
) -> anyhow::Result<Option<v1::PluginGeneration>> {
    match find_plugin(client, name).await {
        Ok(plugin) => Ok(current_of(&plugin).cloned()),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
        Err(status) => Err(status.into()),
    }
}

fn current_of(plugin: &v1::Plugin) -> Option<&v1::PluginGeneration> {
    if plugin.current_generation == 0 {
        return None;
    }
    plugin.generations.iter().find(|generation| generation.generation == plugin.current_generation)
}

fn generation_number(generation: Option<&v1::PluginGeneration>) -> u32 {
    generation.map_or(0, |generation| generation.generation)
}

/// `echo@3 is current (was echo@2)`; `previous` is 0 when nothing was.
fn switch_summary(name: &str, current: u32, previous: u32) -> String {
    if previous == 0 {
        format!("{name}@{current} is current")
    } else if previous == current {
        format!("{name}@{current} was already current")
    } else {
        format!("{name}@{current} is current (was {name}@{previous})")
    }
}

/// What `plugins load` did: the new generation is the highest, since the
/// daemon numbers each load of a name one above the last.
fn load_summary(plugin: &v1::Plugin, previous: u32) -> String {
    let loaded = plugin.generations.iter().map(|generation| generation.generation).max().unwrap_or(0);
    if loaded == plugin.current_generation {
        switch_summary(&plugin.name, loaded, previous)
    } else {
        format!(
            "{}@{loaded} is loaded on standby ({}@{} is current; activate it with `plugins activate {} {loaded}`)",
            plugin.name, plugin.name, plugin.current_generation, plugin.name
        )
    }
}

/// Plugin paths go to the daemon absolute: it resolves relative ones
/// against its own working directory, which is not ours.
fn absolute_path(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))
}

fn path_text(path: &Path) -> anyhow::Result<String> {
    Ok(path.to_str().with_context(|| format!("plugin path {} is not valid UTF-8", path.display()))?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(number: u32, state: v1::GenerationState) -> v1::PluginGeneration {
        v1::PluginGeneration { generation: number, state: state as i32, ..Default::default() }
    }

    #[test]
    fn switch_summaries_name_the_generations() {
        assert_eq!(switch_summary("echo", 3, 2), "echo@3 is current (was echo@2)");
        assert_eq!(switch_summary("echo", 1, 0), "echo@1 is current");
        assert_eq!(switch_summary("echo", 1, 1), "echo@1 was already current");
    }

    #[test]
    fn load_summary_tells_standby_from_current() {
        let mut plugin = v1::Plugin {
            name: "echo".into(),
            current_generation: 1,
            generations: vec![generation(1, v1::GenerationState::Current), generation(2, v1::GenerationState::Standby)],
            ..Default::default()
        };
        assert_eq!(
            load_summary(&plugin, 1),
            "echo@2 is loaded on standby (echo@1 is current; activate it with `plugins activate echo 2`)"
        );
        plugin.current_generation = 2;
        assert_eq!(load_summary(&plugin, 1), "echo@2 is current (was echo@1)");
    }
}
