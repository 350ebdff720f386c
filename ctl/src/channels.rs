//! `asyncorectl channels`: list, show and close the channels in the
//! daemon's channel map.

use asyncore_proto::v1;
use asyncore_proto::v1::channels_client::ChannelsClient;
use serde_json::{Value, json};

use crate::connection::Channel;
use crate::flags::{ChannelsCommand, OutputFormat};
use crate::render::{channel_detail, channel_json, channels_table, print_json, print_text};

pub(crate) async fn run(channel: Channel, command: ChannelsCommand, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = ChannelsClient::new(channel);
    match command {
        ChannelsCommand::Ls { listener } => {
            let channels = list_all_channels(&mut client, listener).await?;
            match format {
                OutputFormat::Json => {
                    let items: Vec<Value> = channels.iter().map(channel_json).collect();
                    print_json(&json!({ "channels": items }))
                }
                OutputFormat::Table => print_text(&channels_table(&channels)),
            }
        }
        ChannelsCommand::Get { id } => {
            let found = client.get_channel(v1::GetChannelRequest { id }).await?.into_inner();
            match format {
                OutputFormat::Json => print_json(&channel_json(&found)),
                OutputFormat::Table => print_text(&channel_detail(&found)),
            }
        }
        ChannelsCommand::Close { id } => {
            let closed = client.close_channel(v1::CloseChannelRequest { id }).await?.into_inner();
            match format {
                OutputFormat::Json => print_json(&channel_json(&closed)),
                OutputFormat::Table => print_text(&channels_table(&[closed])),
            }
        }
    }
}

/// Follows `next_page_token` until the last page, so that `ls` shows every
/// channel whatever page size the daemon picks.
async fn list_all_channels(
    client: &mut ChannelsClient<Channel>,
    listener_id: Option<u64>,
) -> anyhow::Result<Vec<v1::Channel>> {
    let mut channels = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = v1::ListChannelsRequest {
            listener_id,
            // Zero lets the daemon use its default page size.
            page_size: 0,
            page_token: page_token.clone(),
        };
        let page = client.list_channels(request).await?.into_inner();
        channels.extend(page.channels);
        if page.next_page_token.is_empty() {
            return Ok(channels);
        }
        // A daemon that hands back the token it was given would keep us
        // looping forever; stop with a message instead.
        if page.next_page_token == page_token {
            anyhow::bail!("the daemon repeated page token {:?} while listing channels", page_token);
        }
        page_token = page.next_page_token;
    }
}
