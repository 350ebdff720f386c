//! `asyncorectl channels`: list, show and close the channels in the
//! daemon's channel map.

use asyncore_proto::v1;
use asyncore_proto::v1::channels_client::ChannelsClient;
use serde_json::{Value, json};

use crate::connection::Channel;
use crate::flags::{ChannelsCommand, OutputFormat};
use crate::pages;
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

/// Every channel (of one listener), in id order.
async fn list_all_channels(
    client: &mut ChannelsClient<Channel>,
    listener_id: Option<u64>,
) -> anyhow::Result<Vec<v1::Channel>> {
    pages::all("channels", |page_token| {
        let mut client = client.clone();
        // Zero lets the daemon use its default page size.
        let request = v1::ListChannelsRequest { listener_id, page_size: 0, page_token };
        async move {
            let page = client.list_channels(request).await?.into_inner();
            Ok((page.channels, page.next_page_token))
        }
    })
    .await
}
