//! `asyncorectl top`: a live view of the daemon's channels, busiest first,
//! refreshed at every `WatchStats` update, under a header with the daemon's
//! info and its poll loop's figures. Keys change the sort; `q` quits.
//!
//! The stream gives each channel's counters and rates; what it does not
//! carry (plugin generation, peer, age) comes from `GetChannel`, asked only
//! for the rows on screen and only once per channel, and the header from
//! one `GetDaemonInfo` per update. Those calls run in a task of their own,
//! so keys are answered while they wait. [`view`] decides what the screen
//! shows; [`terminal`] draws it and gives the terminal back on the way out.

mod terminal;
mod view;

use std::io::IsTerminal as _;

use asyncore_proto::v1::{self, channels_client::ChannelsClient, daemon_client::DaemonClient};
use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};
use tokio_stream::StreamExt as _;

use self::{
    terminal::Screen,
    view::{Action, ChannelFacts, View},
};
use crate::{
    connection::{Channel, Refused},
    flags::TopArgs,
};

/// What a refresh task brings back.
struct Refreshed {
    info: Result<v1::DaemonInfo, String>,
    facts: Vec<(u64, ChannelFacts)>,
}

/// Runs until `q` (or Esc, Ctrl-C, SIGTERM, SIGHUP), the end of the
/// stream, or an error; the terminal is given back in every case.
///
/// # Errors
///
/// [`Refused`] when stdout is not a terminal; the stream's or the
/// terminal's errors.
pub(crate) async fn run(channel: Channel, args: TopArgs) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        return Err(
            Refused("top needs a terminal; for scripts, `asyncorectl stats` prints a block per update".into()).into()
        );
    }
    // Asked before the terminal is taken: a daemon that refuses (too many
    // watchers, a bad listener id) is reported like any command's error.
    let request = v1::WatchStatsRequest {
        interval_ms: args.interval,
        listener_id: args.listener,
        channel_ids: Vec::new(),
        changed_only: true,
    };
    let mut stream = ChannelsClient::new(channel.clone()).watch_stats(request).await?.into_inner();
    // In raw mode Ctrl-C is a key, not SIGINT; a SIGINT from `kill`, a
    // SIGTERM, or the terminal going away (SIGHUP) must still end `top`
    // through the screen's drop rather than leave the terminal raw.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;

    let mut screen = Screen::enter()?;
    let mut keys = EventStream::new();
    let mut view = View::default();
    let mut refresh: Option<JoinHandle<Refreshed>> = None;
    let mut info_due = true;
    let outcome = loop {
        let (width, height) = Screen::size()?;
        screen.draw(&view.lines(height), width, height)?;
        let missing = view.missing_facts(height);
        if refresh.is_none() && (info_due || !missing.is_empty()) {
            refresh = Some(tokio::spawn(fetch(channel.clone(), missing)));
            info_due = false;
        }
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(update)) => {
                    view.apply_update(update);
                    info_due = true;
                }
                // The daemon ended the stream (it is stopping).
                Ok(None) => break Ok(()),
                Err(status) => break Err(status.into()),
            },
            done = async { refresh.as_mut().expect("guarded by is_some").await }, if refresh.is_some() => {
                refresh = None;
                if let Ok(done) = done {
                    view.apply_info(done.info);
                    view.apply_facts(done.facts);
                }
            }
            event = keys.next() => match event {
                Some(Ok(Event::Key(key))) => match action(key) {
                    Some(Action::Quit) => break Ok(()),
                    Some(action) => view.act(action),
                    None => {}
                },
                // A resize, or another event: the next draw takes the new size.
                Some(Ok(_)) => {}
                Some(Err(error)) => break Err(error.into()),
                None => break Ok(()),
            },
            _ = interrupt.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
            _ = hangup.recv() => break Ok(()),
        }
    };
    if let Some(refresh) = refresh {
        refresh.abort();
    }
    drop(screen);
    outcome
}

/// The key's action, if it has one. Only presses count (some terminals
/// also report releases).
fn action(key: KeyEvent) -> Option<Action> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    match key.code {
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Some(Action::Quit),
        KeyCode::Char('q') | KeyCode::Esc => Some(Action::Quit),
        KeyCode::Char('s' | '>') | KeyCode::Right => Some(Action::NextSort),
        KeyCode::Char('<') | KeyCode::Left => Some(Action::PreviousSort),
        KeyCode::Char('r') => Some(Action::Reverse),
        _ => None,
    }
}

/// The daemon's info, and the facts of the channels in `missing`. A channel
/// that closed meanwhile (NOT_FOUND) gets empty facts, so it is not asked
/// about again; one whose call failed otherwise is asked next time.
async fn fetch(channel: Channel, missing: Vec<u64>) -> Refreshed {
    let info = DaemonClient::new(channel.clone())
        .get_daemon_info(v1::GetDaemonInfoRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| status.message().to_owned());
    let mut channels = ChannelsClient::new(channel);
    let mut facts = Vec::with_capacity(missing.len());
    for id in missing {
        match channels.get_channel(v1::GetChannelRequest { id }).await {
            Ok(reply) => facts.push((id, ChannelFacts::of(reply.get_ref()))),
            Err(status) if status.code() == tonic::Code::NotFound => facts.push((id, ChannelFacts::default())),
            Err(_) => {}
        }
    }
    Refreshed { info, facts }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let press = |code| KeyEvent::new(code, KeyModifiers::NONE);
        assert_eq!(action(press(KeyCode::Char('q'))), Some(Action::Quit));
        assert_eq!(action(press(KeyCode::Esc)), Some(Action::Quit));
        assert_eq!(action(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Some(Action::Quit));
        assert_eq!(action(press(KeyCode::Char('c'))), None);
        assert_eq!(action(press(KeyCode::Char('s'))), Some(Action::NextSort));
        assert_eq!(action(press(KeyCode::Right)), Some(Action::NextSort));
        assert_eq!(action(press(KeyCode::Char('<'))), Some(Action::PreviousSort));
        assert_eq!(action(press(KeyCode::Char('r'))), Some(Action::Reverse));
        let mut release = press(KeyCode::Char('q'));
        release.kind = KeyEventKind::Release;
        assert_eq!(action(release), None);
    }
}
