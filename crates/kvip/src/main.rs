//! kvip: virtual IPs and egress SNAT for Kubernetes LoadBalancer Services.

mod agent;
mod demo;
mod doctor;
mod metrics;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvip_core::DesiredState;
use kvip_dataplane::{
    AnnounceConfig, BackendKind, Config, Dataplane, Instance, KernelDataplane, Variant,
};

#[derive(Parser)]
#[command(
    name = "kvip",
    version,
    about = "Virtual IPs and egress SNAT for Kubernetes LoadBalancer Services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive the node's dataplane directly from a desired-state file.
    Dataplane {
        #[command(flatten)]
        opts: DataplaneOpts,
        #[command(subcommand)]
        action: DataplaneAction,
    },
    /// Run the node agent. Configured with kube-vip's environment variables (see
    /// docs/configuration.md), in either spelling, or with `--set name=value`.
    Run {
        /// A kube-vip option as on the command line instead of the environment, e.g.
        /// `--set vip_interface=eth0` (repeatable). An option also set in the environment to
        /// another value is an error.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// When discovery finds no pod or service CIDR, use kube-vip's guesses (10.0.0.0/16,
        /// 10.96.0.0/12) with a warning instead of refusing egress; the same as
        /// `--set egress_default_cidrs=true`.
        #[arg(long)]
        egress_default_cidrs: bool,
    },
    /// Print manifests to deploy the agent (YAML on stdout).
    Manifest {
        #[arg(value_enum)]
        what: ManifestKind,
        /// Namespace of the agent (its ServiceAccount and Lease).
        #[arg(long, default_value = "kube-system")]
        namespace: String,
        /// Container image of kvip.
        #[arg(long, default_value = "kvip:latest")]
        image: String,
        /// Interface the VIPs go on (vip_interface).
        #[arg(long, default_value = "eth0")]
        interface: String,
        /// Pod CIDRs (egress_podcidr); with --service-cidr, no discovery permissions are granted.
        #[arg(long)]
        pod_cidr: Option<String>,
        /// Service CIDRs (egress_servicecidr).
        #[arg(long)]
        service_cidr: Option<String>,
        /// One Lease per Service (svc_election): Leases are then granted in every namespace.
        #[arg(long)]
        svc_election: bool,
    },
    /// Look at this node (and the cluster, when the API answers) for what would make kvip
    /// misbehave; each finding comes with its fix. Changes nothing. Exit status: 0 nothing
    /// wrong, 1 problems found, 2 the doctor could not run.
    Doctor {
        /// Options as for `kvip run` (the environment is read too); without vip_nodename or
        /// NODE_NAME, the host name is the node name.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: DoctorOutput,
    },
    /// Build a network-namespace lab and show egress through a VIP with real packets.
    Demo {
        /// Rule backend for the demo.
        #[arg(long, default_value = "nftables")]
        backend: BackendArg,
    },
}

#[derive(Subcommand)]
enum DataplaneAction {
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
enum DoctorOutput {
    Text,
    Json,
}

/// `kvip doctor`: whether nothing is wrong.
fn doctor(set: &[String], output: DoctorOutput) -> Result<bool> {
    let mut vars = run_settings(set)?;
    let has_name = ["vip_nodename", "VIP_NODENAME", "NODE_NAME"]
        .iter()
        .any(|k| vars.get(*k).is_some_and(|v| !v.trim().is_empty()));
    if !has_name {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("no vip_nodename or NODE_NAME, and no host name")?;
        vars.insert("NODE_NAME".into(), host.trim().to_string());
    }
    let cfg = kvip_core::config::AgentConfig::from_env(&vars)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(doctor::command(&cfg, matches!(output, DoctorOutput::Json)))
}

#[derive(Clone, Copy, ValueEnum)]
enum ManifestKind {
    /// ServiceAccount, ClusterRole and Roles with exactly the permissions the agent uses.
    Rbac,
    /// The RBAC plus a DaemonSet.
    Daemonset,
    /// A static pod (uses the node's /etc/kubernetes/admin.conf; no RBAC needed).
    Pod,
}

fn manifest(what: ManifestKind, spec: &kvip_kube::rbac::AgentSpec) -> Result<String> {
    use kvip_kube::rbac;
    let discovery = spec.pod_cidr.is_none() || spec.service_cidr.is_none();
    let docs = match what {
        ManifestKind::Rbac => rbac::rbac_manifests(&spec.namespace, discovery, spec.svc_election),
        ManifestKind::Daemonset => {
            let mut d = rbac::rbac_manifests(&spec.namespace, discovery, spec.svc_election);
            d.push(rbac::daemonset(spec));
            d
        }
        ManifestKind::Pod => vec![rbac::static_pod(spec)],
    };
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&d)?);
    }
    Ok(out)
}

#[derive(Clone, Copy, ValueEnum)]
enum ShowFormat {
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
enum BackendArg {
    Nftables,
    Iptables,
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
enum VariantArg {
    Legacy,
    Nft,
}

#[derive(Args)]
struct DataplaneOpts {
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
    fn kind(self) -> BackendKind {
        match self {
            BackendArg::Nftables => BackendKind::Nftables,
            BackendArg::Iptables => BackendKind::Iptables,
            BackendArg::Auto => BackendKind::Auto,
        }
    }
}

impl DataplaneOpts {
    fn config(&self) -> Result<Config> {
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

/// Reads and validates a state file; the error names the file and the field.
fn read_state(path: &PathBuf) -> Result<DesiredState> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the state from stdin")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    if text.trim().is_empty() {
        return Ok(DesiredState::empty());
    }
    // YAML is a superset of JSON: one parser reads both.
    serde_norway::from_str::<DesiredState>(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

async fn dataplane(opts: &DataplaneOpts, action: &DataplaneAction) -> Result<()> {
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
    let mut dp = KernelDataplane::new(cfg).await?;
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
                let is_nft = matches!(dp.backend(), kvip_dataplane::RuleBackend::Nftables(_));
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

/// The environment, with `--set name=value` options merged in (as the lowercase spelling).
/// A `--set` that disagrees with the environment (either spelling) is an error.
/// `set` with `name=true` added when `flag` is on.
fn with_flag(set: &[String], flag: bool, name: &str) -> Vec<String> {
    let mut v = set.to_vec();
    if flag {
        v.push(format!("{name}=true"));
    }
    v
}

fn run_settings(set: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut vars: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    for item in set {
        let (name, value) = item
            .split_once('=')
            .with_context(|| format!("--set {item:?}: expected NAME=VALUE"))?;
        let lower = name.trim().to_ascii_lowercase();
        for spelling in [lower.clone(), lower.to_ascii_uppercase()] {
            if let Some(env) = vars.get(&spelling)
                && env.trim() != value.trim()
            {
                bail!(
                    "--set {lower}={value:?} disagrees with the environment's {spelling}={env:?}: set one of them"
                );
            }
        }
        vars.insert(lower, value.to_string());
    }
    Ok(vars)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent logs what it does; the one-shot commands only what went wrong.
    let default_level = if matches!(cli.command, Command::Run { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Command::Doctor { set, output } = &cli.command {
        return match doctor(set, *output) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("kvip: error: {}", format!("{e:#}").replace('\n', " "));
                ExitCode::from(2)
            }
        };
    }
    let result = match &cli.command {
        Command::Demo { backend } => demo::run(backend.kind()),
        Command::Doctor { .. } => Ok(()),
        Command::Manifest {
            what,
            namespace,
            image,
            interface,
            pod_cidr,
            service_cidr,
            svc_election,
        } => manifest(
            *what,
            &kvip_kube::rbac::AgentSpec {
                namespace: namespace.clone(),
                image: image.clone(),
                interface: interface.clone(),
                pod_cidr: pod_cidr.clone(),
                service_cidr: service_cidr.clone(),
                svc_election: *svc_election,
            },
        )
        .map(|text| print!("{text}")),
        Command::Run {
            set,
            egress_default_cidrs,
        } => run_settings(&with_flag(
            set,
            *egress_default_cidrs,
            "egress_default_cidrs",
        ))
        .and_then(|vars| {
            kvip_core::config::AgentConfig::from_env(&vars).map_err(anyhow::Error::from)
        })
        .and_then(|cfg| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(agent::run(cfg))
        }),
        Command::Dataplane { opts, action } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(dataplane(opts, action))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("{e:#}").replace('\n', " ");
            let denied = e.chain().any(|c| {
                c.downcast_ref::<kvip_dataplane::DataplaneError>()
                    .is_some_and(kvip_dataplane::DataplaneError::is_permission_denied)
            });
            if denied {
                msg.push_str(" (kvip needs root or CAP_NET_ADMIN)");
            }
            eprintln!("kvip: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
