//! `gatehouse export-log`: the embedded event log of a single node, copied
//! into a JetStream stream (`gatehouse_eventlog::export`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use gatehouse_eventlog::{EmbeddedLog, EventLogConfig};

use crate::config::Config;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The data directory of `gatehouse dev` whose log is exported
    /// (`<data-dir>/gatehouse.db`).
    #[arg(long, default_value = ".gatehouse")]
    pub data_dir: PathBuf,
    /// The NATS server (with JetStream) to export to, e.g.
    /// nats://nats.example:4222. Overrides the URL of --config.
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// A Gatehouse config file whose `[events]` section names the target:
    /// stream, subject prefix, credentials and TLS (as the workers use).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    let mut events = match &args.config {
        Some(path) => Config::load(path)?.events,
        None => EventLogConfig::default(),
    };
    match (&args.to, &args.config) {
        (Some(url), _) => events.nats_url = url.clone(),
        (None, Some(_)) => {}
        (None, None) => bail!("say where to export: --to nats://HOST:PORT, or --config FILE"),
    }
    events.validate().map_err(anyhow::Error::msg)?;
    let path = args.data_dir.join("gatehouse.db");
    if !path.exists() {
        bail!(
            "no embedded event log at {} (is --data-dir the one `gatehouse dev` ran with?)",
            path.display()
        );
    }
    let log = EmbeddedLog::open(&path).await?;
    let nats = gatehouse_eventlog::connect(&events, "gatehouse-export").await?;
    let done = gatehouse_eventlog::export::export(&log, &nats, &events)
        .await
        .with_context(|| format!("export to {} stopped", events.nats_url))?;
    println!(
        "exported {} events to stream {} at {}; it now holds the log's events up to sequence {} \
         (running this again copies only later ones)",
        done.events, events.stream, events.nats_url, done.through
    );
    Ok(())
}
