//! `kvip demo`: egress through a VIP, shown with real packets in a lab of network namespaces.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use kvip_core::DesiredState;
use kvip_dataplane::{BackendKind, Config, Dataplane, KernelDataplane};
use kvip_testkit::lab::*;

const STATE: &str = r#"
vips:
  - {address: 192.0.2.10, interface: eth0}
  - {address: "2001:db8:1::10", interface: eth0}
egress:
  - name: demo/web
    vip: 192.0.2.10
    sources: [10.244.1.5]
    exclude: [10.244.0.0/16, 10.96.0.0/12]
  - name: demo/web-v6
    vip: "2001:db8:1::10"
    sources: ["fd00:10:244:1::5"]
    exclude: ["fd00:10:244::/48"]
"#;

fn preflight() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("kvip demo needs root to create network namespaces: run it with sudo (or as root)");
    }
    for (tool, pkg) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("iptables", "iptables"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("{tool} not found: install it with `apt-get install {pkg}`");
        }
    }
    Ok(())
}

/// Deletes the lab's namespaces when the demo is interrupted (Ctrl-C or SIGTERM).
fn cleanup_on_signal(names: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        if let Ok(list) = names.lock() {
            for n in list.iter() {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", n])
                    .status();
            }
        }
        eprintln!("\nkvip demo: interrupted; lab removed");
        std::process::exit(130);
    });
}

fn apply(lab: &EgressLab, backend: BackendKind, s: &DesiredState) -> Result<String> {
    lab.node
        .block_on(|| async {
            let mut dp = KernelDataplane::new(Config {
                backend,
                ..Config::default()
            })
            .await?;
            let r = dp.apply(s).await?;
            dp.wait_announcements().await;
            let listing = if s.is_empty() {
                String::new()
            } else {
                dp.raw_listing().await?
            };
            let observed = dp.observe().await?;
            if observed.state != *s || !observed.stray.is_empty() {
                bail!("read-back differs from the applied state: {:?}", observed);
            }
            Ok::<_, anyhow::Error>(format!(
                "{} ({:?}, {:.1} ms)\n{listing}",
                r.backend,
                r.mode,
                r.duration.as_secs_f64() * 1e3
            ))
        })
        .context("entering the node namespace")?
}

fn expect_seen(lab: &EgressLab, dst: IpAddr, want: IpAddr, what: &str) -> Result<()> {
    let seen = lab
        .seen_tcp(dst, 8080)
        .with_context(|| format!("connecting to {dst}"))?;
    let mark = if seen == want { "ok" } else { "UNEXPECTED" };
    println!("   external host saw {seen:<16} {what} [{mark}]");
    if seen != want {
        bail!("expected {want} ({what}), the external host saw {seen}");
    }
    Ok(())
}

pub fn run(backend: BackendKind) -> Result<()> {
    preflight()?;
    let names = Arc::new(Mutex::new(Vec::new()));
    cleanup_on_signal(names.clone());
    println!("kvip demo: building the lab (network namespaces pod, node, external host)");
    let lab = EgressLab::new("demo", true).context("building the lab")?;
    if let Ok(mut n) = names.lock() {
        *n = lab.namespace_names();
    }
    println!(
        "   pod {POD4} / {POD6}  ->  node {NODE4} / {NODE6} (CNI-like MASQUERADE)  ->  external {EXT4} / {EXT6}"
    );
    println!("\n1. Without kvip, pod traffic leaves masqueraded to the node's address:");
    expect_seen(&lab, EXT4, NODE4, "(node address)")?;
    expect_seen(&lab, EXT6, NODE6, "(node address)")?;

    let state: DesiredState = serde_norway::from_str(STATE).context("demo state")?;
    println!(
        "\n2. kvip applies VIPs {VIP4} and {VIP6} on the node's eth0 and egress policies for the pod:"
    );
    let out = apply(&lab, backend, &state)?;
    for line in out.lines() {
        println!("   {line}");
    }
    println!("3. The same pod, a new TCP connection:");
    expect_seen(&lab, EXT4, VIP4, "(the VIP, ahead of the MASQUERADE rule)")?;
    expect_seen(&lab, EXT6, VIP6, "(the VIP)")?;

    println!("\n4. kvip removes the policies and the VIPs:");
    apply(&lab, backend, &DesiredState::empty())?;
    expect_seen(&lab, EXT4, NODE4, "(node address again)")?;
    expect_seen(&lab, EXT6, NODE6, "(node address again)")?;
    let left = lab.node.exec_ok("nft", &["list", "ruleset"])?;
    let ipt = lab.node.exec_ok("iptables-save", &[])?;
    if left.contains("table inet kvip") || ipt.contains("KVIP-") {
        bail!("kvip objects remain after removal");
    }
    println!("   kvip objects left on the node: none");
    drop(lab);
    if let Ok(mut n) = names.lock() {
        n.clear();
    }
    println!("\nlab removed");
    Ok(())
}
