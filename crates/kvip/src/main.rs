//! kvip: virtual IPs and egress SNAT for Kubernetes LoadBalancer Services.

//!
//! One module per subcommand: `run` ([`agent`]), [`dataplane`], [`manifest`], [`doctor`],
//! [`demo`].

mod agent;
mod dataplane;
mod demo;
mod doctor;
mod manifest;
mod metrics;
mod settings;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dataplane::{BackendArg, DataplaneAction, DataplaneOpts};
use doctor::DoctorOutput;
use manifest::ManifestKind;
use settings::{run_settings, with_flag};

/// `kvip --version`: the package version and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KVIP_COMMIT"),
    ")"
);

/// The name `scripts/dev image` gives the image of this version.
const DEFAULT_IMAGE: &str = concat!("localhost/kvip:", env!("CARGO_PKG_VERSION"));

#[derive(Parser)]
#[command(
    name = "kvip",
    version = VERSION,
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
        /// Container image of kvip (default: the image `scripts/dev image` builds from this
        /// version).
        #[arg(long, default_value = DEFAULT_IMAGE)]
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
        /// With `pod`: the static pod of a control-plane node holding the API server's VIP
        /// (cp_enable), for /etc/kubernetes/manifests; needs --address.
        #[arg(long)]
        control_plane: bool,
        /// The control-plane VIP (address).
        #[arg(long, requires = "control_plane")]
        address: Option<std::net::IpAddr>,
        /// The API server's port (port).
        #[arg(long, default_value_t = 6443, requires = "control_plane")]
        port: u16,
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
        return match doctor::from_cli(set, *output) {
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
            control_plane,
            address,
            port,
        } => manifest::control_plane(*what, *control_plane, *address, *port)
            .and_then(|cp| {
                manifest::command(
                    *what,
                    &kvip_kube::rbac::AgentSpec {
                        namespace: namespace.clone(),
                        image: image.clone(),
                        interface: interface.clone(),
                        pod_cidr: pod_cidr.clone(),
                        service_cidr: service_cidr.clone(),
                        svc_election: *svc_election,
                        control_plane: cp,
                    },
                )
            })
            .map(|text| print!("{text}")),
        Command::Run {
            set,
            egress_default_cidrs,
        } => run_settings(&with_flag(
            set,
            *egress_default_cidrs,
            "egress_default_cidrs",
        ))
        .and_then(|mut vars| {
            // A control-plane static pod may run before any Node object: the host name then.
            let cp = ["cp_enable", "CP_ENABLE"]
                .iter()
                .filter_map(|k| vars.get(*k))
                .any(|v| {
                    matches!(
                        v.trim().to_ascii_lowercase().as_str(),
                        "true" | "1" | "yes" | "on"
                    )
                });
            if cp {
                settings::default_node_name(&mut vars)?;
            }
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
            .and_then(|rt| rt.block_on(dataplane::command(opts, action))),
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
