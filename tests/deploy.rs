//! Offline validation of what an operator deploys (issue 6): the container image recipe
//! (`deploy/Dockerfile`), the ear-sidecar kustomize component as the examples under
//! `deploy/k8s/examples/` and the Helm post-renderer (`deploy/k8s/helm/`) apply it, the
//! prometheus-operator objects and the plain Prometheus scrape example.
//!
//! No cluster and no Docker engine are needed. External tools (installed by
//! `.ci/setup.d/deploy.sh`): `kubectl` (its built-in `kustomize`), `kubernetes-validate` (PyPI,
//! offline JSON schemas of the Kubernetes API), `python3` with PyYAML (for
//! `deploy/k8s/validate.py`) and `promtool`. A missing tool fails the test with a message naming
//! the setup script, never a silent skip.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::Parser;
use ear_sidecar::config::{Cli, Command as CliCommand, ServeConfig};

/// Every example composition of the component (each renders a whole bundle).
const EXAMPLES: [&str; 4] = ["aws-irsa", "aws-secret", "local-trial", "no-crds"];

/// The bundle the Helm post-renderer makes of a YugabyteDB chart release (the fixture imitates
/// the chart's rendered tserver StatefulSet).
const HELM: &str = "helm-post-renderer";

/// Kubernetes versions the core objects must validate against: the first with native sidecars
/// enabled by default (1.29) and the newest schemas `kubernetes-validate` ships.
const K8S_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool, failing with a clear message when it is not installed.
fn run(program: &str, args: &[&std::ffi::OsStr], cwd: &Path) -> Output {
    match Command::new(program).args(args).current_dir(cwd).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run `{program}` ({e}): install the deployment validation tools with \
             `bash .ci/setup.d/deploy.sh` (as root)"
        ),
    }
}

fn must_succeed(what: &str, o: &Output) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        o.status
    );
    stdout
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// One bundle, written to `dir/rendered.yaml`: `kubectl kustomize` of an example, or for
/// [`HELM`] the post-renderer run on the chart fixture.
fn render(bundle: &str, dir: &Path) -> PathBuf {
    let yaml = if bundle == HELM {
        let script = root().join("deploy/k8s/helm/post-render.sh");
        let input =
            std::fs::File::open(root().join("tests/fixtures/yb-chart-tserver.yaml")).unwrap();
        let o = Command::new("bash")
            .arg(&script)
            .current_dir(root())
            .stdin(input)
            .output()
            .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
        let yaml = must_succeed(
            "deploy/k8s/helm/post-render.sh < tests/fixtures/yb-chart-tserver.yaml",
            &o,
        );
        // The chart's own claim, init container and containers survive; ear-data is appended.
        for kept in [
            "name: datadir0",
            "name: yb-tserver-pg-data-ownership-fix",
            "name: yb-cleanup",
            "name: ear-data",
        ] {
            assert!(
                yaml.contains(kept),
                "post-renderer output lacks `{kept}`:\n{yaml}"
            );
        }
        yaml
    } else {
        let path = root().join("deploy/k8s/examples").join(bundle);
        let o = run("kubectl", &[os("kustomize"), path.as_os_str()], &root());
        must_succeed(&format!("kubectl kustomize {}", path.display()), &o)
    };
    assert!(
        yaml.contains("kind: StatefulSet"),
        "{bundle} renders no StatefulSet"
    );
    let out = dir.join("rendered.yaml");
    std::fs::write(&out, yaml).unwrap();
    out
}

/// The flags `ear-sidecar serve --help` documents, as long names without dashes.
fn serve_flags() -> BTreeSet<String> {
    let o = run(
        env!("CARGO_BIN_EXE_ear-sidecar"),
        &[os("serve"), os("--help")],
        &root(),
    );
    let help = must_succeed("ear-sidecar serve --help", &o);
    let mut flags = BTreeSet::new();
    for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        if let Some(rest) = word.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                flags.insert(name);
            }
        }
    }
    assert!(
        flags.contains("data-dir") && flags.contains("kms-key-id"),
        "unexpected help output:\n{help}"
    );
    flags
}

fn flag_of_env(var: &str) -> Option<String> {
    var.strip_prefix("EAR_")
        .map(|s| s.to_ascii_lowercase().replace('_', "-"))
}

#[test]
fn overlays_render_and_validate_offline() {
    let flags = serve_flags();
    let tmp = tempfile::tempdir().unwrap();
    for overlay in EXAMPLES.into_iter().chain([HELM]) {
        let dir = tmp.path().join(overlay);
        std::fs::create_dir_all(&dir).unwrap();
        let rendered = render(overlay, &dir);
        let out = dir.join("out");

        // Structure, references, CRD objects; splits the bundle for the tools below.
        let o = run(
            "python3",
            &[
                root().join("deploy/k8s/validate.py").as_os_str(),
                rendered.as_os_str(),
                out.as_os_str(),
            ],
            &root(),
        );
        must_succeed(&format!("deploy/k8s/validate.py on overlay {overlay}"), &o);
        check_job_name(overlay, &out.join("monitoring.json"), &rendered);

        // Core objects against the Kubernetes OpenAPI schemas, strictly (unknown fields fail).
        let core = out.join("core.yaml");
        for version in K8S_VERSIONS {
            let o = run(
                "kubernetes-validate",
                &[os("--strict"), os("-k"), os(version), core.as_os_str()],
                &root(),
            );
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                o.status.success() && !text.contains("ERROR") && !text.contains("Couldn't find"),
                "overlay {overlay} is not valid for Kubernetes {version}:\n{text}"
            );
            assert!(
                text.contains("passed"),
                "kubernetes-validate checked nothing:\n{text}"
            );
        }

        // The PrometheusRule's rules, as Prometheus itself loads them.
        let o = run(
            "promtool",
            &[os("check"), os("rules"), out.join("rules.yml").as_os_str()],
            &root(),
        );
        must_succeed(&format!("promtool check rules (overlay {overlay})"), &o);

        check_sidecar_agrees_with_cli(overlay, &out.join("sidecar.json"), &flags, &dir);
    }
}

/// The scrape job the ServiceMonitor gives the sidecars (derived by validate.py from the rendered
/// ServiceMonitor and Service: the value of the `jobLabel` label, else the Service name) is the
/// one the alert rules select, and validate.py fails a bundle whose rules could never match it.
fn check_job_name(bundle: &str, monitoring: &Path, rendered: &Path) {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring).unwrap()).unwrap();
    let text = std::fs::read_to_string(rendered).unwrap();
    let has_operator = text.contains("kind: ServiceMonitor");
    match bundle {
        "local-trial" | "no-crds" => assert!(
            !text.contains("monitoring.coreos.com"),
            "{bundle} must not need the prometheus-operator CRDs"
        ),
        _ => assert!(has_operator, "{bundle} has no ServiceMonitor"),
    }
    if !has_operator {
        return;
    }
    assert_eq!(
        m["jobs"],
        serde_json::json!(["ear-sidecar"]),
        "{bundle}: {m}"
    );
    let selectors = m["selectors"].as_array().unwrap();
    assert!(
        selectors.iter().any(|s| s["rule"] == "EarSidecarDown"),
        "{bundle}: EarSidecarDown selects no job: {m}"
    );
    // The check has teeth: the same bundle without jobLabel (the operator then names the job
    // after the Service) is rejected, naming the alert that could never fire.
    let dir = rendered.parent().unwrap();
    let broken = dir.join("no-joblabel.yaml");
    let without: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("jobLabel:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&broken, without).unwrap();
    let o = run(
        "python3",
        &[
            root().join("deploy/k8s/validate.py").as_os_str(),
            broken.as_os_str(),
            dir.join("out-broken").as_os_str(),
        ],
        &root(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("EarSidecarDown")
            && err.contains("ear-sidecar-metrics"),
        "{bundle}: validate.py accepted a ServiceMonitor whose job the rules never select:\n{err}"
    );
}

/// The plain Prometheus example names its Kubernetes job as the rules expect.
#[test]
fn scrape_example_job_is_the_one_the_rules_select() {
    let example =
        std::fs::read_to_string(root().join("deploy/prometheus-scrape.example.yml")).unwrap();
    let jobs: Vec<&str> = example
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- job_name:"))
        .map(str::trim)
        .collect();
    let rules =
        std::fs::read_to_string(root().join("deploy/prometheus/ear-sidecar.rules.yml")).unwrap();
    let selected: Vec<&str> = rules
        .split("job=\"")
        .skip(1)
        .map(|part| part.split('"').next().unwrap())
        .collect();
    assert!(!selected.is_empty(), "no rule selects a job");
    for job in &selected {
        assert!(
            jobs.contains(job),
            "a rule selects job=\"{job}\" but the scrape example has only {jobs:?}"
        );
    }
}

/// Everything the manifests pass to ear-sidecar exists in its CLI, and the configuration it
/// ends up with resolves without error (the same code path `serve` runs before binding).
fn check_sidecar_agrees_with_cli(
    overlay: &str,
    summary: &Path,
    flags: &BTreeSet<String>,
    dir: &Path,
) {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    let args: Vec<String> = s["args"]
        .as_array()
        .expect("ear-sidecar container has args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert!(
        s["command"].is_null(),
        "{overlay}: the image ENTRYPOINT must stay in force"
    );
    assert_eq!(
        args.first().map(String::as_str),
        Some("serve"),
        "{overlay}: {args:?}"
    );
    for a in &args {
        if let Some(flag) = a.strip_prefix("--") {
            let flag = flag.split('=').next().unwrap_or(flag);
            assert!(
                flags.contains(flag),
                "{overlay}: --{flag} is not an `ear-sidecar serve` option"
            );
        }
    }

    let env: Vec<(String, Option<String>)> = s["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
        .collect();
    for (var, _) in &env {
        if let Some(flag) = flag_of_env(var) {
            assert!(
                flags.contains(&flag),
                "{overlay}: {var} names no option (--{flag})"
            );
        } else {
            assert!(
                var.starts_with("AWS_"),
                "{overlay}: unexpected environment variable {var} for ear-sidecar"
            );
        }
    }

    // The config file: every key is an option (snake_case of a long flag) and the whole thing
    // resolves, with the manifests' environment, exactly as `serve` would resolve it.
    let files = s["config_files"].as_object().unwrap();
    let config_idx = args
        .iter()
        .position(|a| a == "--config")
        .expect("--config passed");
    let config_path = args.get(config_idx + 1).expect("--config value");
    let text = files
        .get(config_path)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("{overlay}: {config_path} is not mounted from a ConfigMap"));
    let table: toml::Table = text.parse().unwrap();
    for key in table.keys() {
        let flag = key.replace('_', "-");
        assert!(
            flags.contains(&flag),
            "{overlay}: config key {key} is no option (--{flag})"
        );
    }
    let local = dir.join("config.toml");
    std::fs::write(&local, text).unwrap();
    let mut argv: Vec<OsString> = vec!["ear-sidecar".into()];
    argv.extend(args.iter().map(OsString::from));
    if let Some(v) = argv.get_mut(config_idx + 2) {
        *v = local.clone().into_os_string();
    }
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{overlay}: {e}"));
    let CliCommand::Serve(serve) = cli.command else {
        panic!("{overlay}: not `serve`")
    };
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.clone().map(OsString::from))
    };
    let cfg = ServeConfig::load(&serve, &lookup)
        .unwrap_or_else(|e| panic!("{overlay}: the deployed configuration is rejected: {e}"));

    // Metrics reachable from the kubelet and Prometheus, on the port the probes and Service use.
    let addr = cfg.metrics_addr.expect("metrics enabled");
    assert!(
        addr.ip().is_unspecified(),
        "{overlay}: metrics bound to {addr}, unreachable in a pod"
    );
    assert_eq!(
        s["ports"]["metrics"].as_u64(),
        Some(u64::from(addr.port())),
        "{overlay}: container port vs metrics_addr"
    );
    assert_eq!(s["probes"]["livenessProbe"]["path"], "/livez");
    assert_eq!(s["probes"]["readinessProbe"]["path"], "/readyz");
    assert_eq!(s["probes"]["startupProbe"]["path"], "/readyz");
    assert!(
        cfg.allow_uids == [0],
        "{overlay}: only the attach step (uid 0) may connect: {:?}",
        cfg.allow_uids
    );
    assert_eq!(cfg.socket, PathBuf::from("/run/ear/ear.sock"));
    assert!(cfg.data_dir.starts_with("/var/lib/ear-sidecar"));
    match overlay {
        "local-trial" => assert!(
            matches!(cfg.kms, Some(ear_sidecar::config::KmsConfig::Local { .. })),
            "local-trial uses the local provider"
        ),
        _ => assert!(
            matches!(cfg.kms, Some(ear_sidecar::config::KmsConfig::Aws { ref key_id, .. }) if key_id.starts_with("arn:aws:kms:")),
            "{overlay}: production overlays use an AWS CMK ARN: {:?}",
            cfg.kms
        ),
    }
    // The image's non-root user is the one the manifests pin.
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let uid = s["run_as_user"].as_u64().unwrap();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim() == format!("USER {uid}:{uid}")),
        "{overlay}: runAsUser {uid} differs from the Dockerfile's USER"
    );
}

#[test]
fn prometheusrule_and_dashboard_match_deploy_prometheus() {
    let o = run(
        "bash",
        &[
            root().join("deploy/k8s/gen-prometheusrule.sh").as_os_str(),
            os("--check"),
        ],
        &root(),
    );
    must_succeed(
        "deploy/k8s/gen-prometheusrule.sh --check (the committed PrometheusRule / dashboard copy \
         is stale: rerun the script)",
        &o,
    );
    let rules: Vec<_> = std::fs::read_dir(root().join("deploy/prometheus"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    if !rules
        .iter()
        .any(|n| n.to_string_lossy().ends_with(".rules.yml"))
    {
        eprintln!(
            "note: no deploy/prometheus/*.rules.yml yet; the PrometheusRule is a placeholder"
        );
    }
}

#[test]
fn scrape_example_passes_promtool() {
    let example = root().join("deploy/prometheus-scrape.example.yml");
    let o = run(
        "promtool",
        &[os("check"), os("config"), example.as_os_str()],
        &root(),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() {
        return;
    }
    // Debian's promtool is built without Kubernetes service discovery. Then check everything
    // else: the same file with each kubernetes_sd_configs replaced by a static target.
    assert!(
        text.contains("field kubernetes_sd_configs not found"),
        "promtool check config failed:\n{text}"
    );
    eprintln!("note: this promtool lacks kubernetes_sd_configs; checking the rest of the file");
    let src = std::fs::read_to_string(&example).unwrap();
    let mut out = String::new();
    let mut skipping: Option<usize> = None;
    for line in src.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(level) = skipping {
            if line.trim().is_empty() || indent > level {
                continue;
            }
            skipping = None;
        }
        if line.trim_start().starts_with("kubernetes_sd_configs:") {
            out.push_str(&" ".repeat(indent));
            out.push_str("static_configs: [{targets: [\"127.0.0.1:9898\"]}]\n");
            skipping = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    // rule_files are relative to the config file: keep the same layout.
    let copy = dir.path().join("prometheus-scrape.example.yml");
    std::fs::write(&copy, out).unwrap();
    std::fs::create_dir_all(dir.path().join("prometheus")).unwrap();
    if let Ok(d) = std::fs::read_dir(root().join("deploy/prometheus")) {
        for e in d.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().ends_with(".yml") {
                std::fs::copy(e.path(), dir.path().join("prometheus").join(e.file_name())).unwrap();
            }
        }
    }
    let o = run(
        "promtool",
        &[os("check"), os("config"), copy.as_os_str()],
        &root(),
    );
    must_succeed("promtool check config (without kubernetes_sd_configs)", &o);
}

/// The Dockerfile builds the binary the way this test suite's build does, and runs it with
/// options the CLI has. (No Docker engine runs in CI, so the image itself is not built here.)
#[test]
fn dockerfile_agrees_with_cargo_and_cli() {
    let df = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    // One logical instruction per entry (continuation lines joined).
    let joined = df.replace("\\\n", " ");
    let instrs: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let find = |kw: &str| -> Vec<&str> {
        instrs
            .iter()
            .filter_map(|l| l.strip_prefix(kw).map(str::trim))
            .collect()
    };

    // Build command: valid cargo flags, an existing binary target, an up-to-date lock file.
    let build = find("RUN")
        .into_iter()
        .find(|r| r.contains("cargo build"))
        .expect("a RUN with cargo build");
    let cargo_args: Vec<&str> = build
        .split("cargo build")
        .nth(1)
        .unwrap()
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert!(cargo_args.contains(&"--release") && cargo_args.contains(&"--locked"));
    let help = must_succeed(
        "cargo build --help",
        &run(env!("CARGO"), &[os("build"), os("--help")], &root()),
    );
    for a in &cargo_args {
        if a.starts_with("--") {
            assert!(help.contains(a), "cargo build has no option {a}");
        }
    }
    let bin_idx = cargo_args
        .iter()
        .position(|a| *a == "--bin")
        .expect("--bin");
    assert_eq!(cargo_args.get(bin_idx + 1), Some(&"ear-sidecar"));
    // The builder stage's build context, mirrored: exactly the paths it COPYs (each must be let
    // through by .dockerignore). In it, the lock file must be current (--locked) and cargo must
    // accept the manifest and command line; RUSTC points nowhere so nothing is compiled and the
    // only acceptable failure is cargo trying to run rustc.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let ctx = tempfile::tempdir().unwrap();
    let builder: Vec<&str> = instrs
        .iter()
        .skip_while(|l| !l.ends_with("AS builder"))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM"))
        .copied()
        .collect();
    let mut copied = Vec::new();
    for c in builder.iter().filter_map(|l| l.strip_prefix("COPY")) {
        let parts: Vec<&str> = c.split_whitespace().collect();
        assert!(
            parts.len() >= 2 && !parts[0].starts_with("--"),
            "unexpected COPY {c}"
        );
        for src in &parts[..parts.len() - 1] {
            let allowed = if root().join(src).is_dir() {
                format!("!{src}/")
            } else {
                format!("!{src}")
            };
            assert!(
                ignore.lines().any(|l| l.trim() == allowed),
                ".dockerignore lacks {allowed}"
            );
            copy_tree(&root().join(src), &ctx.path().join(src));
            copied.push(src.to_string());
        }
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src"] {
        assert!(
            copied.iter().any(|c| c == needed),
            "Dockerfile does not COPY {needed}"
        );
    }
    // Every target Cargo.toml declares must be in the context: cargo refuses a manifest whose
    // declared targets are missing, even when building one binary. This is checked from the
    // files alone, so it needs no network and no crate cache: running cargo here would make the
    // test depend on what the machine's cache happens to hold. That the lock file is current is
    // checked by CI's `cargo clippy --locked`.
    let manifest: toml::Table = std::fs::read_to_string(ctx.path().join("Cargo.toml"))
        .unwrap()
        .parse()
        .expect("Cargo.toml parses");
    let declared = |kind: &str, dir: &str| -> Vec<PathBuf> {
        manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .map(|targets| {
                targets
                    .iter()
                    .map(|t| match t.get("path").and_then(|p| p.as_str()) {
                        Some(p) => PathBuf::from(p),
                        None => {
                            let name = t["name"].as_str().expect("target name");
                            PathBuf::from(format!("{dir}/{name}.rs"))
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let bins = declared("bin", "src/bin");
    assert!(
        manifest["bin"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"].as_str() == Some("ear-sidecar")),
        "binary target ear-sidecar"
    );
    for target in bins
        .iter()
        .chain(&declared("bench", "benches"))
        .chain(&declared("test", "tests"))
        .chain(&declared("example", "examples"))
        .chain(std::iter::once(&PathBuf::from("src/lib.rs")))
    {
        assert!(
            ctx.path().join(target).is_file(),
            "Cargo.toml declares {} but the Dockerfile does not COPY it",
            target.display()
        );
    }
    assert_eq!(
        std::fs::read(ctx.path().join("Cargo.lock")).unwrap(),
        std::fs::read(root().join("Cargo.lock")).unwrap(),
        "the image builds from the repository's lock file"
    );
    assert!(
        build.contains("target/release/ear-sidecar"),
        "the release binary is installed"
    );

    // Runtime: the binary, non-root, the right entrypoint and a CMD the CLI accepts.
    assert!(df.contains("COPY --from=builder /out/ear-sidecar /usr/local/bin/ear-sidecar"));
    assert!(build.contains("/out/ear-sidecar"));
    let last_from = find("FROM").last().copied().unwrap();
    assert!(
        last_from.ends_with("AS runtime"),
        "runtime must be the default (last) stage"
    );
    let user = find("USER");
    assert_eq!(
        user.last().copied(),
        Some("65532:65532"),
        "non-root runtime user"
    );
    let entry = find("ENTRYPOINT");
    assert_eq!(
        entry.last().copied(),
        Some(r#"["/usr/local/bin/ear-sidecar"]"#)
    );
    let cmd: Vec<String> = serde_json::from_str(find("CMD").last().unwrap()).unwrap();
    assert_eq!(cmd, ["serve", "--config", "/etc/ear-sidecar/config.toml"]);
    let flags = serve_flags();
    for a in &cmd {
        if let Some(f) = a.strip_prefix("--") {
            assert!(flags.contains(f), "CMD passes unknown option --{f}");
        }
    }
    let mut argv = vec!["ear-sidecar".to_owned()];
    argv.extend(cmd);
    Cli::try_parse_from(argv).expect("the image's default command parses");
}

#[test]
fn attach_script_is_valid_bash() {
    let script = root().join("deploy/k8s/components/ear-sidecar/attach.sh");
    let o = run("bash", &[os("-n"), script.as_os_str()], &root());
    must_succeed("bash -n deploy/k8s/components/ear-sidecar/attach.sh", &o);
    let text = std::fs::read_to_string(&script).unwrap();
    for needle in [
        "nbd-client -unix",
        "-N \"$EXPORT\"",
        "nbd-client -d",
        "umount",
        "mkfs",
    ] {
        assert!(text.contains(needle), "attach.sh lacks {needle}");
    }
    // Unknown subcommand: usage error, no side effects.
    let o = run("bash", &[script.as_os_str(), os("bogus")], &root());
    assert_eq!(o.status.code(), Some(2));
}

/// Copies a file or directory tree (the part of the build context a COPY takes).
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

/// The operator-facing scripts answer `--help` with their usage and exit 0, without running
/// anything (fio-compare.sh would otherwise build and benchmark for minutes).
#[test]
fn scripts_print_usage_on_help() {
    for (program, script, needle) in [
        (
            "bash",
            "benches/fio-compare.sh",
            "Usage: benches/fio-compare.sh",
        ),
        ("python3", "deploy/k8s/validate.py", "Usage: validate.py"),
        ("bash", "deploy/k8s/helm/post-render.sh", "helm install"),
    ] {
        let path = root().join(script);
        for flag in ["--help", "-h"] {
            let start = std::time::Instant::now();
            let o = run(program, &[path.as_os_str(), os(flag)], &root());
            let out = must_succeed(&format!("{script} {flag}"), &o);
            assert!(out.contains(needle), "{script} {flag} printed:\n{out}");
            assert!(
                o.stderr.is_empty(),
                "{script} {flag} wrote to stderr:\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "{script} {flag} took {:?}: it ran instead of printing usage",
                start.elapsed()
            );
        }
        // A stray argument is a usage error (exit 2), not a run.
        let o = run(program, &[path.as_os_str(), os("--bogus")], &root());
        assert_eq!(o.status.code(), Some(2), "{script} --bogus");
    }
}
