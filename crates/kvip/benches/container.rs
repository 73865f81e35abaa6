//! Container bench: a 1,000-pod apply by the image's kvip, started by runc, against the same
//! apply by the host's kvip, alternately, each into a fresh network namespace. Needs root, runc,
//! umoci and the archive `scripts/dev image` writes (or `KVIP_IMAGE_ARCHIVE`).
//!
//!     cargo bench -p kvip --bench container
//!     KVIP_BENCH_RUNS=15 KVIP_BENCH_PODS=1000 cargo bench -p kvip --bench container
//!
//! Three figures per run:
//! - host: `kvip dataplane apply` entered into the namespace, from spawn to exit;
//! - container, start to applied: from `runc start` of a container that `runc create` has
//!   already set up (namespaces, mounts, capabilities) to the exit of its kvip, seen as the
//!   end of its output;
//! - container, whole: `runc create` + `runc start` + exit, which adds the runtime's set-up.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvip_testkit::Netns;

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `pods` pods in Services of ten, one VIP per Service.
fn state(pods: usize) -> String {
    let mut s = String::from("vips:\n");
    let services = pods.div_ceil(10);
    for i in 0..services {
        s.push_str(&format!(
            "  - {{address: 198.51.{}.{}, interface: eth0}}\n",
            100 + i / 250,
            i % 250 + 1
        ));
    }
    s.push_str("egress:\n");
    for i in 0..services {
        let sources: Vec<String> = (0..10.min(pods - i * 10))
            .map(|k| std::net::Ipv4Addr::from(0x0a80_0000u32 + (i * 10 + k) as u32 + 1).to_string())
            .collect();
        s.push_str(&format!(
            "  - {{name: default/svc{i}, vip: 198.51.{}.{}, sources: [{}], exclude: [10.128.0.0/9]}}\n",
            100 + i / 250,
            i % 250 + 1,
            sources.join(", ")
        ));
    }
    s
}

fn node() -> (Netns, Netns) {
    let ns = Netns::new("ctb").expect("netns");
    let peer = Netns::new("ctbp").expect("netns");
    ns.veth("eth0", &peer, "eth0").expect("veth");
    (ns, peer)
}

const APPLY: [&str; 6] = [
    "dataplane",
    "--announce-count",
    "0",
    "apply",
    "--state",
    "/state/state.yaml",
];

/// The image unpacked into an OCI runtime bundle whose config runs `APPLY` in `netns` with
/// the manifests' capabilities and mounts.
struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    fn new(archive: &Path, work: &Path) -> Bundle {
        let layout = work.join("layout");
        std::fs::create_dir_all(&layout).expect("layout dir");
        ok(Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-xf")
            .arg(archive));
        let dir = work.join("bundle");
        ok(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!(
                "{}:{}",
                layout.display(),
                env!("CARGO_PKG_VERSION")
            ))
            .arg(&dir));
        Bundle { dir }
    }

    fn configure(&self, netns: &str, state_dir: &Path) {
        let path = self.dir.join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("config")).expect("json");
        let mut args = vec![serde_json::json!("/usr/local/bin/kvip")];
        args.extend(APPLY.iter().map(|a| serde_json::json!(a)));
        c["process"]["args"] = serde_json::json!(args);
        c["process"]["terminal"] = serde_json::json!(false);
        let caps = serde_json::json!(["CAP_NET_ADMIN", "CAP_NET_RAW"]);
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set] = caps.clone();
        }
        c["process"]["capabilities"]["inheritable"] = serde_json::json!([]);
        c["process"]["capabilities"]["ambient"] = serde_json::json!([]);
        c["process"]["rlimits"] = serde_json::json!([]);
        let namespaces = c["linux"]["namespaces"].as_array_mut().expect("namespaces");
        for n in namespaces.iter_mut() {
            if n["type"] == "network" {
                n["path"] = serde_json::json!(format!("/run/netns/{netns}"));
            }
        }
        let mounts = c["mounts"].as_array_mut().expect("mounts");
        mounts.retain(|m| m["destination"] != "/state" && m["destination"] != "/run/kvip");
        for (src, dst, opts) in [
            (
                state_dir.display().to_string(),
                "/state",
                vec!["rbind", "ro"],
            ),
            ("/run/kvip".to_string(), "/run/kvip", vec!["rbind", "rw"]),
        ] {
            mounts.push(serde_json::json!({"destination": dst, "type": "bind", "source": src, "options": opts}));
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&c).expect("json")).expect("config");
    }

    /// (start to applied, whole) for one container run.
    fn run(&self, id: &str) -> (Duration, Duration) {
        let t0 = Instant::now();
        let mut create = Command::new("runc")
            .args(["create", "--bundle"])
            .arg(&self.dir)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runc create");
        let mut out = create.stdout.take().expect("stdout");
        let mut err = create.stderr.take().expect("stderr");
        let status = create.wait().expect("runc create");
        assert!(status.success(), "runc create failed");
        let t1 = Instant::now();
        ok(Command::new("runc").args(["start", id]));
        // kvip holds the pipes until it exits.
        let mut text = String::new();
        out.read_to_string(&mut text).expect("container stdout");
        let mut etext = String::new();
        err.read_to_string(&mut etext).expect("container stderr");
        let t2 = Instant::now();
        let state = ok(Command::new("runc").args(["state", id]));
        ok(Command::new("runc").args(["delete", "--force", id]));
        assert!(state.contains("\"stopped\""), "{state}");
        assert!(etext.is_empty(), "the container's kvip failed: {etext}");
        (t2 - t1, t2 - t0)
    }
}

fn host_apply(ns: &Netns, state: &Path) -> Duration {
    let t0 = Instant::now();
    ok(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(KVIP)
        .args(&APPLY[..5])
        .arg(state));
    t0.elapsed()
}

fn teardown(ns: &Netns) {
    ok(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .args([KVIP, "dataplane", "teardown"]));
}

fn held(ns: &Netns) -> String {
    ok(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .args([KVIP, "dataplane", "show"]))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    if !kvip_testkit::bench_start("container", "network namespaces, runc") {
        return;
    }
    let runs = env_usize("KVIP_BENCH_RUNS", 11);
    let pods = env_usize("KVIP_BENCH_PODS", 1000);
    let archive = std::env::var_os("KVIP_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target")
                .join(format!("kvip-{}.oci.tar", env!("CARGO_PKG_VERSION")))
        });
    assert!(
        archive.is_file(),
        "no archive at {}: run scripts/dev image",
        archive.display()
    );
    let work = std::env::temp_dir().join(format!("kvip-bench-container-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let state_dir = work.join("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let state_file = state_dir.join("state.yaml");
    std::fs::write(&state_file, state(pods)).expect("state");
    let bundle = Bundle::new(&archive, &work);

    let (mut host, mut start, mut whole) = (vec![], vec![], vec![]);
    // One unmeasured round first: page cache, the modules the first apply loads.
    for round in 0..=runs {
        let (ns, _peer) = node();
        bundle.configure(ns.name(), &state_dir);
        let id = format!("kvip-bench-{}-{round}", std::process::id());
        // Alternately first and second into the namespace, so neither gains from the order.
        let (h, (s, w), want, got) = if round % 2 == 0 {
            let h = host_apply(&ns, &state_file);
            let want = held(&ns);
            teardown(&ns);
            let sw = bundle.run(&id);
            (h, sw, want, held(&ns))
        } else {
            let sw = bundle.run(&id);
            let got = held(&ns);
            teardown(&ns);
            let h = host_apply(&ns, &state_file);
            (h, sw, held(&ns), got)
        };
        assert_eq!(got, want, "the container applied another state");
        assert!(want.contains("default/svc0"), "nothing applied: {want}");
        if round > 0 {
            host.push(h);
            start.push(s);
            whole.push(w);
        }
    }
    let (h, s, w) = (median(host), median(start), median(whole));
    println!("{pods} pods, {runs} runs each, medians:");
    println!("  host kvip apply:                 {}", ms(h));
    println!(
        "  container, start to applied:     {}  ({:.2}x the host)",
        ms(s),
        s.as_secs_f64() / h.as_secs_f64()
    );
    println!(
        "  container, create+start+applied: {}  ({:.2}x the host)",
        ms(w),
        w.as_secs_f64() / h.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&work);
}
