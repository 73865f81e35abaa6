//! `kvip dataplane`: drive the node's dataplane directly from a desired-state file.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use kvip_core::DesiredState;
use kvip_dataplane::{
    AnnounceConfig, BackendKind, Config, Dataplane, Instance, KernelDataplane, Variant,
};

/// The largest state file read (a state of 100,000 pods is a few MiB).
const MAX_STATE_BYTES: u64 = 64 << 20;
/// The most announcements sent per VIP added.
const MAX_ANNOUNCE_COUNT: u32 = 100;

#[derive(Subcommand)]
pub(crate) enum DataplaneAction {
    /// Make kvip's kernel objects equal the state in FILE (YAML or JSON; - for stdin).
    Apply {
        #[arg(long, value_name = "FILE")]
        state: PathBuf,
        /// Print the apply report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read kvip's kernel objects back.
    Show {
        #[arg(long, value_enum, default_value = "yaml")]
        format: ShowFormat,
    },
    /// Remove everything kvip owns (rules of both backends, VIP addresses).
    Teardown,
    /// Remove kube-vip's leftover egress rules and tables (and nothing else).
    CleanLegacy,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ShowFormat {
    /// The read-back state, in the state-file schema.
    Yaml,
    /// The read-back state as JSON.
    Json,
    /// The raw nftables listing of kvip's table.
    Nft,
    /// The raw iptables-save lines of kvip's chains.
    Iptables,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum BackendArg {
    Nftables,
    Iptables,
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum VariantArg {
    Legacy,
    Nft,
}

#[derive(Args)]
pub(crate) struct DataplaneOpts {
    /// Rule backend: nftables, iptables, or auto (nftables when `nft` works).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "KVIP_BACKEND"
    )]
    backend: BackendArg,
    /// Instance name (1-8 of a-z0-9): table kvip_<name>, chains KVIP-<NAME>-*.
    #[arg(long, global = true, env = "KVIP_INSTANCE")]
    instance: Option<String>,
    /// iptables variant (detected from the host's rules when not given).
    #[arg(long, global = true, value_enum)]
    iptables_variant: Option<VariantArg>,
    /// Do not flush conntrack entries of pods whose translation changed.
    #[arg(long, global = true)]
    no_conntrack_flush: bool,
    /// Gratuitous ARP / unsolicited NA messages sent when a VIP is added (0 disables).
    #[arg(long, global = true, default_value_t = 3)]
    announce_count: u32,
    /// Interval between those messages, in milliseconds.
    #[arg(long, global = true, default_value_t = 500)]
    announce_interval_ms: u64,
}

impl BackendArg {
    pub(crate) fn kind(self) -> BackendKind {
        match self {
            BackendArg::Nftables => BackendKind::Nftables,
            BackendArg::Iptables => BackendKind::Iptables,
            BackendArg::Auto => BackendKind::Auto,
        }
    }
}

impl DataplaneOpts {
    fn config(&self) -> Result<Config> {
        if self.announce_count > MAX_ANNOUNCE_COUNT {
            bail!(
                "--announce-count {}: at most {MAX_ANNOUNCE_COUNT}",
                self.announce_count
            );
        }
        if self.announce_interval_ms == 0 || self.announce_interval_ms > 60_000 {
            bail!(
                "--announce-interval-ms {}: from 1 to 60000",
                self.announce_interval_ms
            );
        }
        Ok(Config {
            instance: Instance::new(self.instance.as_deref())?,
            backend: self.backend.kind(),
            iptables_variant: self.iptables_variant.map(|v| match v {
                VariantArg::Legacy => Variant::Legacy,
                VariantArg::Nft => Variant::Nft,
            }),
            no_conntrack_flush: self.no_conntrack_flush,
            announce: AnnounceConfig {
                count: self.announce_count,
                interval: Duration::from_millis(self.announce_interval_ms),
            },
        })
    }
}

/// Reads and validates a state file; the error names the file and the field. An empty file
/// is an error (a truncated or mistyped file must not remove everything): an empty state is
/// written `{}` (or use `kvip dataplane teardown`).
fn read_state(path: &PathBuf) -> Result<DesiredState> {
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_STATE_BYTES + 1)
            .read_to_string(&mut text)
            .context("reading the state from stdin")?;
    } else {
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if len > MAX_STATE_BYTES {
            bail!(
                "{}: {len} bytes, more than the {MAX_STATE_BYTES} a state file may have",
                path.display()
            );
        }
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_STATE_BYTES + 1).read_to_string(&mut text))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    if text.len() as u64 > MAX_STATE_BYTES {
        bail!(
            "{}: more than the {MAX_STATE_BYTES} bytes a state file may have",
            path.display()
        );
    }
    if text.trim().is_empty() {
        bail!(
            "{}: the state is empty; write {{}} for an empty state, or use `kvip dataplane teardown`",
            path.display()
        );
    }
    // YAML is a superset of JSON: one parser reads both.
    serde_norway::from_str::<DesiredState>(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub(crate) async fn command(opts: &DataplaneOpts, action: &DataplaneAction) -> Result<()> {
    // Validate the input before touching the kernel: bad input applies nothing.
    let desired = match action {
        DataplaneAction::Apply { state, .. } => Some(read_state(state)?),
        _ => None,
    };
    if let DataplaneAction::CleanLegacy = action {
        let r = kvip_dataplane::legacy::clean_legacy().await;
        for line in &r.removed {
            println!("removed {line}");
        }
        if r.removed.is_empty() {
            println!("no kube-vip leftovers found");
        }
        if !r.errors.is_empty() {
            bail!("clean-legacy: {}", r.errors.join("; "));
        }
        return Ok(());
    }
    let cfg = opts.config()?;
    let mut dp = match action {
        // Without nft or iptables, kvip's addresses still go.
        DataplaneAction::Teardown => KernelDataplane::for_teardown(cfg).await?,
        _ => KernelDataplane::new(cfg).await?,
    };
    match action {
        DataplaneAction::Apply { json, .. } => {
            let desired = desired.context("no state")?;
            let r = dp.apply(&desired).await?;
            dp.wait_announcements().await;
            for w in &r.warnings {
                eprintln!("kvip: warning: {w}");
            }
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "applied with {}: {:?}, objects +{} -{}, elements +{} -{}, VIPs +{} -{}, conntrack flushed for {} pods, {:.1} ms",
                    r.backend,
                    r.mode,
                    r.objects_written,
                    r.objects_removed,
                    r.elements_added,
                    r.elements_removed,
                    r.vips_added.len(),
                    r.vips_removed.len(),
                    r.conntrack_flushed,
                    r.duration.as_secs_f64() * 1000.0
                );
            }
        }
        DataplaneAction::Show { format } => match format {
            ShowFormat::Yaml | ShowFormat::Json => {
                let o = dp.observe().await?;
                let spec = o.state.to_spec();
                if matches!(format, ShowFormat::Json) {
                    println!("{}", serde_json::to_string_pretty(&spec)?);
                } else {
                    print!("{}", serde_norway::to_string(&spec)?);
                }
                for s in &o.stray {
                    eprintln!("kvip: stray object (not written by kvip in this form): {s}");
                }
            }
            ShowFormat::Nft | ShowFormat::Iptables => {
                let want_nft = matches!(format, ShowFormat::Nft);
                let is_nft = dp.backend().iptables_variant().is_none();
                if want_nft != is_nft {
                    bail!(
                        "the backend in use is {}; choose it with --backend",
                        dp.backend().name()
                    );
                }
                print!("{}", dp.raw_listing().await?);
            }
        },
        DataplaneAction::Teardown => {
            let r = dp.teardown().await;
            for line in &r.removed {
                println!("removed {line}");
            }
            if !r.errors.is_empty() {
                bail!("teardown left errors: {}", r.errors.join("; "));
            }
        }
        DataplaneAction::CleanLegacy => {}
    }
    Ok(())
}
