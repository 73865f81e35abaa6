//! The container image `scripts/dev image` builds (`target/kvip-<version>.oci.tar`, or the
//! archive `KVIP_IMAGE_ARCHIVE` names), run for real: through podman and runc in a network
//! namespace with every backend, loaded back from its archive, and imported and run by a
//! node's containerd. The image must be built from this very commit: the test fails on a
//! stale archive instead of testing an old binary.

mod runtime;

use std::path::PathBuf;
use std::process::Command;

use kvip_testkit::{Netns, require_kernel};
use runtime::{Containerd, Podman, archive, image_name, stdout_of};

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");

const STATE: &str = r#"
vips: [{address: 192.0.2.10, interface: eth0}]
egress:
  - {name: default/web, vip: 192.0.2.10, sources: [10.244.1.5, 10.244.1.6], exclude: [10.244.0.0/16]}
"#;

/// `kvip --version` of the binary under test: the image must say the same.
fn host_version() -> String {
    stdout_of(Command::new(KVIP).arg("--version"))
}

/// `kvip dataplane <opts> <args>` on the host, inside `ns`.
fn host_kvip(ns: &Netns, opts: &[&str], args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), KVIP, "dataplane"])
        .args(opts)
        .args(args);
    stdout_of(&mut cmd)
}

/// What the kernel holds of kvip's kind, read with the host's own tools.
fn kernel(ns: &Netns, backend: &[&str]) -> String {
    let mut s = ns
        .exec_ok("ip", &["-4", "addr", "show", "eth0"])
        .expect("ip");
    match backend {
        ["--backend", "nftables"] => {
            s.push_str(&ns.exec_ok("nft", &["list", "ruleset"]).expect("nft"));
        }
        ["--backend", "iptables", "--iptables-variant", v] => {
            let save = format!("iptables-{v}-save");
            s.push_str(&ns.exec_ok(&save, &["-t", "nat"]).expect("iptables-save"));
        }
        other => panic!("unknown backend options {other:?}"),
    }
    s
}

#[test]
fn the_image_applies_shows_and_tears_down_with_every_backend() {
    require_kernel!();
    let podman = Podman::new("dp");
    podman.load(&archive());
    assert_eq!(
        podman.run_ok(&["--network", "none"], &["--version"]),
        host_version(),
        "the image was built from another commit: run scripts/dev image"
    );
    // What the manifests' FileOrCreate volume does on a node.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/run/xtables.lock")
        .expect("/run/xtables.lock");
    let dir = runtime::TempDir::new("img-dp");
    std::fs::write(dir.path().join("state.yaml"), STATE).expect("write state");
    let state_mount = format!("{}:/state:ro", dir.path().display());
    for backend in [
        &["--backend", "nftables"][..],
        &["--backend", "iptables", "--iptables-variant", "legacy"],
        &["--backend", "iptables", "--iptables-variant", "nft"],
    ] {
        let ns = Netns::new("img").expect("netns");
        let peer = Netns::new("imgp").expect("netns");
        ns.veth("eth0", &peer, "eth0").expect("veth");
        let net = format!("ns:/run/netns/{}", ns.name());
        // As the manifests run it: host network, NET_ADMIN and NET_RAW only, the host's
        // /run/kvip (the lock the host's kvip processes take too) and xtables lock.
        let opts = [
            "--network",
            &net,
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN,NET_RAW",
            "-v",
            &state_mount,
            "-v",
            "/run/kvip:/run/kvip",
            "-v",
            "/run/xtables.lock:/run/xtables.lock",
        ];
        let dataplane = |args: &[&str]| {
            let mut full = vec!["dataplane"];
            full.extend_from_slice(backend);
            full.extend_from_slice(args);
            podman.run_ok(&opts, &full)
        };
        let empty = host_kvip(&ns, backend, &["show"]);
        dataplane(&[
            "--announce-count",
            "0",
            "apply",
            "--state",
            "/state/state.yaml",
        ]);
        let held = kernel(&ns, backend);
        assert!(held.contains("192.0.2.10/32"), "{backend:?}: {held}");
        assert!(held.contains("10.244.1.6"), "{backend:?}: {held}");
        let shown = dataplane(&["show"]);
        assert_eq!(shown, host_kvip(&ns, backend, &["show"]), "{backend:?}");
        assert!(shown.contains("10.244.1.5"), "{backend:?}: {shown}");
        // The container's read-back agrees that the kernel holds exactly the file's state.
        dataplane(&["apply", "--state", "/state/state.yaml"]);
        dataplane(&["teardown"]);
        assert_eq!(host_kvip(&ns, backend, &["show"]), empty, "{backend:?}");
        let left = kernel(&ns, backend);
        assert!(!left.contains("192.0.2.10"), "{backend:?}: {left}");
        assert!(!left.contains("10.244.1.5"), "{backend:?}: {left}");
    }
}

#[test]
fn the_archive_loads_back_under_its_name_and_labels() {
    require_kernel!();
    let podman = Podman::new("load");
    podman.load(&archive());
    let labels = stdout_of(podman.cmd().args([
        "image",
        "inspect",
        "--format",
        "{{json .Labels}}",
        &image_name(),
    ]));
    let labels: serde_json::Value = serde_json::from_str(&labels).expect("labels");
    let version = host_version();
    let commit = version
        .trim()
        .rsplit_once("(commit ")
        .and_then(|(_, c)| c.strip_suffix(')'))
        .expect("version names a commit");
    assert_eq!(labels["org.opencontainers.image.revision"], commit);
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    // The default image of the manifests is the image's own name.
    let manifest = stdout_of(Command::new(KVIP).args(["manifest", "daemonset"]));
    assert!(
        manifest.contains(&format!("image: {}\n", image_name())),
        "{manifest}"
    );
}

#[test]
fn a_nodes_containerd_imports_and_runs_the_image() {
    require_kernel!();
    let containerd = Containerd::start("ctr");
    let archive: PathBuf = archive();
    containerd.ctr_ok(&[
        "-n",
        "k8s.io",
        "images",
        "import",
        "--snapshotter",
        "native",
        archive.to_str().expect("path"),
    ]);
    let names = containerd.ctr_ok(&["-n", "k8s.io", "images", "list", "-q"]);
    assert!(
        names.lines().any(|l| l == image_name()),
        "containerd names: {names}"
    );
    let out = containerd.ctr_ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "native",
        &image_name(),
        "kvip-version",
        "/usr/local/bin/kvip",
        "--version",
    ]);
    assert_eq!(out, host_version());
}
