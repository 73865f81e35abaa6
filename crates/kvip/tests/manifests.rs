//! Every manifest `kvip manifest` prints is valid for every Kubernetes version kvip supports,
//! checked offline against Kubernetes' published schemas in strict mode (an unknown field
//! fails) by `kubernetes-validate`: `KVIP_KUBERNETES_VALIDATE`, else the one `scripts/dev test`
//! installs under `target/tools`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");

/// The Kubernetes versions whose schemas the manifests are checked against.
const VERSIONS: &[&str] = &[
    "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];

fn validator() -> PathBuf {
    let path = std::env::var_os("KVIP_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/tools/python/bin/kubernetes-validate")
        });
    assert!(
        path.is_file(),
        "no kubernetes-validate at {}: scripts/dev test installs it",
        path.display()
    );
    path
}

fn manifest(args: &[&str]) -> String {
    let out = Command::new(KVIP)
        .arg("manifest")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kvip manifest");
    assert!(
        out.status.success(),
        "kvip manifest {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The resources of a multi-document manifest, as `kind/name` in lower case.
fn resources(text: &str) -> Vec<String> {
    text.split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            let v: serde_json::Value = serde_norway::from_str(d).expect("YAML");
            let kind = v["kind"].as_str().expect("kind").to_lowercase();
            let name = v["metadata"]["name"].as_str().expect("name");
            format!("{kind}/{name}")
        })
        .collect()
}

#[test]
fn every_manifest_is_valid_for_every_supported_kubernetes_version() {
    let validator = validator();
    let dir = std::env::temp_dir().join(format!("kvip-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cases: &[(&str, &[&str])] = &[
        ("rbac", &["rbac"]),
        ("rbac-svc-election", &["rbac", "--svc-election"]),
        ("daemonset", &["daemonset", "--namespace", "kvip-system"]),
        (
            "daemonset-cidrs",
            &[
                "daemonset",
                "--pod-cidr",
                "10.244.0.0/16",
                "--service-cidr",
                "10.96.0.0/12",
                "--image",
                "registry.example/kvip:1",
            ],
        ),
        ("pod", &["pod", "--interface", "ens3"]),
        (
            "pod-control-plane",
            &[
                "pod",
                "--control-plane",
                "--address",
                "192.0.2.100",
                "--interface",
                "ens3",
            ],
        ),
    ];
    for (name, args) in cases {
        let text = manifest(args);
        let expected = resources(&text);
        assert!(!expected.is_empty(), "{name}: no resource");
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &text).expect("write manifest");
        for version in VERSIONS {
            let out = Command::new(&validator)
                .args(["--strict", "-k", version])
                .arg(&file)
                .stdin(Stdio::null())
                .output()
                .expect("run kubernetes-validate");
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "{name} on {version}: {report}\n{text}"
            );
            // Every resource was checked, none skipped for want of a schema.
            let minor = version.rsplit_once('.').map_or(*version, |(v, _)| v);
            for r in &expected {
                let passed = format!("passed for resource {r} against version {minor}");
                assert!(
                    report.contains(&passed),
                    "{name} on {version}: {r}\n{report}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The static pod for /etc/kubernetes/manifests: host network, NET_ADMIN and NET_RAW added and
/// everything else dropped, admin.conf mounted read-only, super-admin.conf optional (created
/// empty where kubeadm wrote none), kube-vip's variable names, no hostAliases.
#[test]
fn the_control_plane_static_pod_has_the_shape_a_kubeadm_node_needs() {
    let text = manifest(&[
        "pod",
        "--control-plane",
        "--address",
        "192.0.2.100",
        "--interface",
        "ens3",
        "--image",
        "registry.example/kvip:1",
    ]);
    let docs: Vec<&str> = text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .collect();
    assert_eq!(docs.len(), 1, "{text}");
    let pod: serde_json::Value = serde_norway::from_str(docs[0]).expect("YAML");
    let spec = &pod["spec"];
    assert_eq!(pod["metadata"]["namespace"], "kube-system");
    assert_eq!(spec["hostNetwork"], true);
    assert!(spec.get("hostAliases").is_none(), "{text}");
    let c = &spec["containers"][0];
    assert_eq!(c["image"], "registry.example/kvip:1");
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    let env: std::collections::BTreeMap<String, String> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    for (k, v) in [
        ("cp_enable", "true"),
        ("address", "192.0.2.100"),
        ("port", "6443"),
        ("vip_interface", "ens3"),
        ("vip_arp", "true"),
        ("vip_leaderelection", "true"),
        ("vip_leasename", "plndr-cp-lock"),
        ("cp_namespace", "kube-system"),
        ("k8s_config_file", "/etc/kubernetes/admin.conf"),
    ] {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
    }
    let mounts = c["volumeMounts"].as_array().expect("mounts");
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    assert_eq!(mount("/etc/kubernetes/admin.conf")["readOnly"], true);
    assert_eq!(mount("/etc/kubernetes/super-admin.conf")["readOnly"], true);
    let volumes = spec["volumes"].as_array().expect("volumes");
    let host_path = |path: &str| {
        volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == path)
            .unwrap_or_else(|| panic!("no volume of {path}"))["hostPath"]["type"]
            .clone()
    };
    assert_eq!(host_path("/etc/kubernetes/admin.conf"), "File");
    assert_eq!(
        host_path("/etc/kubernetes/super-admin.conf"),
        "FileOrCreate"
    );
    // --control-plane belongs to the static pod only, and needs the VIP.
    for args in [
        &["daemonset", "--control-plane", "--address", "192.0.2.100"][..],
        &["pod", "--control-plane"],
        &["pod", "--control-plane", "--address", "127.0.0.1"],
    ] {
        let out = Command::new(KVIP)
            .arg("manifest")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kvip manifest");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}
