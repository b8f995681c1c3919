//! Unit tests of the configuration layers.

use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use super::*;
use crate::store::{ExportName, ExportSpec};

use std::collections::HashMap;

fn no_env(_: &str) -> Option<OsString> {
    None
}

fn serve_args(argv: &[&str]) -> ServeArgs {
    let mut full = vec!["ear-sidecar", "serve"];
    full.extend_from_slice(argv);
    match Cli::try_parse_from(full) {
        Ok(Cli {
            command: Command::Serve(a),
        }) => a,
        Ok(other) => panic!("not serve: {other:?}"),
        Err(e) => panic!("parse failed: {e}"),
    }
}

fn resolve(
    argv: &[&str],
    env: &[(&str, &str)],
    toml: Option<&str>,
) -> Result<ServeConfig, ConfigError> {
    let args = serve_args(argv);
    let mut map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    // The local KEK's default lives under $HOME.
    map.entry("HOME".into()).or_insert_with(|| "/home/t".into());
    let lookup = move |k: &str| map.get(k).map(OsString::from);
    let file = toml
        .map(|t| ConfigFile::parse(Path::new("test.toml"), t))
        .transpose()?;
    ServeConfig::resolve(&args, &lookup, file.as_ref())
}

fn err_text(r: Result<ServeConfig, ConfigError>) -> String {
    match r {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sizes() {
    assert_eq!(parse_size("0").unwrap(), 0);
    assert_eq!(parse_size("512").unwrap(), 512);
    assert_eq!(parse_size("4K").unwrap(), 4096);
    assert_eq!(parse_size("4k").unwrap(), 4096);
    assert_eq!(parse_size("4KiB").unwrap(), 4096);
    assert_eq!(parse_size("4kib").unwrap(), 4096);
    assert_eq!(parse_size("32M").unwrap(), 32 << 20);
    assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
    assert_eq!(parse_size("1G").unwrap(), 1 << 30);
    assert_eq!(parse_size("1 GiB").unwrap(), 1 << 30);
    assert_eq!(parse_size("2T").unwrap(), 2 << 40);
    assert_eq!(parse_size("7b").unwrap(), 7);
    assert_eq!(parse_size("16777215T").unwrap(), 16_777_215u64 << 40);
    for bad in [
        "",
        "K",
        "-1",
        "1.5G",
        "1X",
        "1KB",
        "G1",
        "18446744073709551616",
        "16777216T1",
    ] {
        assert!(parse_size(bad).is_err(), "{bad} accepted");
    }
    // Overflow of the multiplication.
    let e = parse_size("16777216T").unwrap_err().to_string();
    assert!(e.contains("too large") && e.contains("16777216T"), "{e}");
}

#[test]
fn export_sizes() {
    assert_eq!(
        parse_export("a=1G").unwrap(),
        ExportSpec {
            name: ExportName::parse("a").unwrap(),
            size: 1 << 30
        }
    );
    assert_eq!(parse_export("a=512").unwrap().size, 512);
    assert_eq!(parse_export("a=1024T").unwrap().size, 1 << 50);
    let zero = parse_export("a=0").unwrap_err().to_string();
    assert!(zero.contains("greater than zero"), "{zero}");
    let odd = parse_export("a=1000").unwrap_err().to_string();
    assert!(odd.contains("multiple of 512"), "{odd}");
    let big = parse_export("a=1025T").unwrap_err().to_string();
    assert!(big.contains("maximum"), "{big}");
    assert!(parse_export("a").is_err());
    assert!(parse_export("a=").is_err());
    assert!(parse_export("=1G").is_err());
}

#[test]
fn export_names() {
    for good in ["default", "a", "A-b_c.d", "x.", &"n".repeat(64)] {
        validate_export_name(good).unwrap();
    }
    let long = "n".repeat(65);
    for bad in [
        "",
        ".hidden",
        "..",
        "a/b",
        "../x",
        "a b",
        "é",
        "a,b",
        "a=b",
        long.as_str(),
    ] {
        assert!(validate_export_name(bad).is_err(), "{bad:?} accepted");
    }
    let e = err_text(resolve(&[], &[("EAR_EXPORT", "ok=1G,../etc=1G")], None));
    assert!(
        e.contains("--export") && e.contains("EAR_EXPORT") && e.contains("../etc"),
        "{e}"
    );
    assert!(Cli::try_parse_from(["ear-sidecar", "serve", "--export", ".x=1G"]).is_err());
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
    assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    assert_eq!(parse_duration("8760h").unwrap(), MAX_DURATION);
    for bad in [
        "",
        "s",
        "5",
        "1.5s",
        "5d",
        "5 min",
        "-1s",
        "8761h",
        "99999999999999999999s",
        "307445734561825861h",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn socket_modes() {
    assert_eq!(parse_socket_mode("600").unwrap(), 0o600);
    assert_eq!(parse_socket_mode("0600").unwrap(), 0o600);
    assert_eq!(parse_socket_mode("0o660").unwrap(), 0o660);
    for bad in ["", "0o", "800", "1777", "abc", "0400"] {
        assert!(parse_socket_mode(bad).is_err(), "{bad} accepted");
    }
    let c = resolve(&[], &[], Some("socket_mode = 0o660")).unwrap();
    assert_eq!(c.socket_mode, 0o660);
    let c = resolve(&[], &[], Some("socket_mode = \"0640\"")).unwrap();
    assert_eq!(c.socket_mode, 0o640);
    assert!(resolve(&[], &[], Some("socket_mode = 600")).is_err());
}

#[test]
fn defaults() {
    let c = resolve(&[], &[], None).unwrap();
    assert_eq!(
        c,
        ServeConfig {
            config_file: None,
            data_dir: PathBuf::from("./ear-data"),
            socket: PathBuf::from("./ear.sock"),
            socket_mode: 0o600,
            admin_socket: Some(PathBuf::from("./ear.admin.sock")),
            exports: Exports::Default,
            encryption: Encryption::On,
            kms: Some(KmsConfig::Local {
                kek_file: PathBuf::from("/home/t/.config/ear-sidecar/local.kek")
            }),
            kms_startup_timeout: Duration::from_secs(60),
            kms_check_interval: Duration::from_secs(300),
            kms_revocation_grace: Duration::from_secs(300),
            allow_uids: vec![],
            max_request: 32 << 20,
            max_connections: 256,
            key_cache_size: NonZeroUsize::new(1024).unwrap(),
            metrics_addr: Some("127.0.0.1:9898".parse().unwrap()),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            integrity: false,
            epoch_writes: None,
            rotation: RotationConfig::default(),
        }
    );
    // The KEK default never lies in the data directory.
    let c = resolve(&["--data-dir", "/d"], &[("XDG_CONFIG_HOME", "/x")], None).unwrap();
    assert_eq!(
        c.kms,
        Some(KmsConfig::Local {
            kek_file: PathBuf::from("/x/ear-sidecar/local.kek")
        })
    );
}

#[test]
fn a_kek_inside_the_data_dir_needs_the_loud_override() {
    let e = err_text(resolve(
        &["--data-dir", "/d", "--local-kek-file", "/d/local.kek"],
        &[],
        None,
    ));
    assert!(e.contains("inside the data directory"), "{e}");
    assert!(e.contains("--insecure-kek-in-data-dir"), "{e}");
    let c = resolve(
        &[
            "--data-dir",
            "/d",
            "--local-kek-file",
            "/d/local.kek",
            "--insecure-kek-in-data-dir",
        ],
        &[],
        None,
    )
    .unwrap();
    assert_eq!(
        c.kms,
        Some(KmsConfig::Local {
            kek_file: PathBuf::from("/d/local.kek")
        })
    );
    let c = resolve(
        &["--data-dir", "/d", "--local-kek-file", "/d/local.kek"],
        &[("EAR_INSECURE_KEK_IN_DATA_DIR", "on")],
        None,
    );
    assert!(c.is_ok());
    // Without HOME or XDG_CONFIG_HOME there is no default: say what to pass.
    let args = serve_args(&[]);
    let e = ServeConfig::resolve(&args, &no_env, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--local-kek-file"), "{e}");
}

#[test]
fn an_explicit_default_export_is_explicit() {
    // `--export default=2G` names the default export's name, but it is
    // still a configured size: it must grow an existing export.
    let c = resolve(&["--export", "default=2G"], &[], None).unwrap();
    assert_eq!(
        c.exports,
        Exports::Explicit(vec![ExportSpec {
            name: ExportName::parse("default").unwrap(),
            size: 2 << 30
        }])
    );
}

#[test]
fn precedence_cli_env_file_default() {
    let toml = r#"
        data_dir = "/file"
        socket = "/file.sock"
        max_connections = 7
        log_format = "json"
        export = ["f=1G"]
        allow_uid = [3]
    "#;
    let env = [
        ("EAR_DATA_DIR", "/env"),
        ("EAR_MAX_CONNECTIONS", "8"),
        ("EAR_EXPORT", "e1=1M, e2=2M"),
    ];
    // All four layers at once: data_dir from CLI, max_connections/export
    // from env, socket/log_format/allow_uid from file, the rest default.
    let c = resolve(&["--data-dir", "/cli"], &env, Some(toml)).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/cli"));
    assert_eq!(c.max_connections, 8);
    assert_eq!(
        c.exports
            .explicit()
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["e1", "e2"]
    );
    assert_eq!(c.socket, PathBuf::from("/file.sock"));
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.allow_uids, [3]);
    assert_eq!(c.key_cache_size.get(), 1024);
    assert_eq!(c.config_file, Some(PathBuf::from("test.toml")));
    // Env over file.
    let c = resolve(&[], &env, Some(toml)).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/env"));
    // File over default.
    let c = resolve(&[], &[], Some(toml)).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/file"));
    assert_eq!(c.max_connections, 7);
    assert_eq!(
        c.exports,
        Exports::Explicit(vec![parse_export("f=1G").unwrap()])
    );
    // CLI lists replace env lists; repeated flags accumulate.
    let c = resolve(
        &[
            "--export",
            "c=1M",
            "--export",
            "d=1M",
            "--allow-uid",
            "5",
            "--allow-uid",
            "4",
        ],
        &env,
        Some(toml),
    )
    .unwrap();
    assert_eq!(c.exports.explicit().len(), 2);
    assert_eq!(c.exports.explicit()[0].name.as_str(), "c");
    assert_eq!(c.allow_uids, [4, 5]);
    // An empty env var counts as unset.
    let c = resolve(&[], &[("EAR_DATA_DIR", "")], Some(toml)).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/file"));
}

#[test]
fn env_values_are_validated_with_origin() {
    let e = err_text(resolve(&[], &[("EAR_MAX_REQUEST", "2G")], None));
    assert!(
        e.contains("--max-request") && e.contains("EAR_MAX_REQUEST"),
        "{e}"
    );
    let e = err_text(resolve(&[], &[("EAR_ENCRYPTION", "maybe")], None));
    assert!(e.contains("--encryption") && e.contains("maybe"), "{e}");
    let e = err_text(resolve(&[], &[], Some("max_request = \"1K\"")));
    assert!(e.contains("max_request") && e.contains("test.toml"), "{e}");
    let e = err_text(resolve(&["--max-request", "2K"], &[], None));
    assert!(
        e.contains("--max-request") && e.contains("command line"),
        "{e}"
    );
    assert_eq!(
        resolve(&[], &[("EAR_MAX_REQUEST", "1G")], None)
            .unwrap()
            .max_request,
        1 << 30
    );
    assert!(resolve(&[], &[("EAR_KEY_CACHE_SIZE", "0")], None).is_err());
    // On the command line the range is checked while parsing.
    assert!(Cli::try_parse_from(["ear-sidecar", "serve", "--max-connections", "0"]).is_err());
    assert!(resolve(&[], &[("EAR_MAX_CONNECTIONS", "0")], None).is_err());
    assert!(resolve(&[], &[("EAR_KMS_CHECK_INTERVAL", "500ms")], None).is_err());
    assert!(resolve(&[], &[("EAR_KMS_STARTUP_TIMEOUT", "0")], None).is_err());
    assert!(resolve(&[], &[("EAR_LOG_LEVEL", "info,[[[")], None).is_err());
    assert_eq!(
        resolve(&[], &[("EAR_LOG_LEVEL", "warn,ear_sidecar=debug")], None)
            .unwrap()
            .log_level,
        "warn,ear_sidecar=debug"
    );
    let c = resolve(&[], &[("EAR_ALLOW_UID", "1000,0,1000")], None).unwrap();
    assert_eq!(c.allow_uids, [0, 1000]);
    assert!(resolve(&[], &[("EAR_ALLOW_UID", "-1")], None).is_err());
}

#[test]
fn metrics_addr_empty_disables() {
    assert_eq!(
        resolve(&["--metrics-addr", ""], &[], None)
            .unwrap()
            .metrics_addr,
        None
    );
    assert_eq!(
        resolve(&[], &[("EAR_METRICS_ADDR", "")], None)
            .unwrap()
            .metrics_addr,
        None
    );
    assert_eq!(
        resolve(&[], &[], Some("metrics_addr = \"\""))
            .unwrap()
            .metrics_addr,
        None
    );
    assert_eq!(
        resolve(&[], &[("EAR_METRICS_ADDR", "[::1]:9000")], None)
            .unwrap()
            .metrics_addr,
        Some("[::1]:9000".parse().unwrap())
    );
    let e = err_text(resolve(&["--metrics-addr", "localhost"], &[], None));
    assert!(
        e.contains("--metrics-addr") && e.contains("localhost"),
        "{e}"
    );
}

#[test]
fn toml_unknown_key_rejected() {
    let e = ConfigFile::parse(
        Path::new("x.toml"),
        "data_dir = \"/d\"\nexprot = [\"a=1G\"]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("exprot") && e.contains("x.toml"), "{e}");
    // `config` and `path` are not file keys either.
    assert!(ConfigFile::parse(Path::new("x"), "config = \"y\"").is_err());
    assert!(ConfigFile::parse(Path::new("x"), "path = \"y\"").is_err());
    // Wrong type names the key.
    let e = ConfigFile::parse(Path::new("x"), "allow_uid = \"1000\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("allow_uid"), "{e}");
}

#[test]
fn toml_value_forms() {
    let c = resolve(
        &[],
        &[],
        Some("max_request = 65536\nencryption = true\nintegrity = \"on\"\nkms_revocation_grace = \"0\""),
    )
    .unwrap();
    assert_eq!(c.max_request, 65536);
    assert_eq!(c.encryption, Encryption::On);
    assert!(c.integrity);
    assert_eq!(c.kms_revocation_grace, Duration::ZERO);
    assert!(resolve(&[], &[], Some("max_request = -1")).is_err());
}

#[test]
fn load_reads_config_file_from_cli_or_env() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ear.toml");
    std::fs::write(&path, "data_dir = \"/from-file\"\n").unwrap();
    let p = path.to_str().unwrap();
    let args = serve_args(&["--config", p]);
    let home = |k: &str| (k == "HOME").then(|| OsString::from("/home/t"));
    let c = ServeConfig::load(&args, &home).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/from-file"));
    assert_eq!(c.config_file.as_deref(), Some(path.as_path()));
    let env = |k: &str| match k {
        "EAR_CONFIG" => Some(OsString::from(p)),
        "HOME" => Some(OsString::from("/home/t")),
        _ => None,
    };
    let c = ServeConfig::load(&serve_args(&[]), &env).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/from-file"));
    let missing = serve_args(&["--config", "/nonexistent/ear.toml"]);
    let e = ServeConfig::load(&missing, &no_env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/ear.toml"), "{e}");
}

#[test]
fn duplicate_export_rejected() {
    let e = err_text(resolve(
        &["--export", "a=1G", "--export", "a=2G"],
        &[],
        None,
    ));
    assert!(e.contains("'a'") && e.contains("twice"), "{e}");
    assert!(resolve(&[], &[("EAR_EXPORT", "a=1G,b=1G,a=1G")], None).is_err());
    assert!(resolve(&[], &[], Some("export = [\"x=1G\", \"x=1G\"]")).is_err());
}

#[test]
fn kms_rules() {
    let e = err_text(resolve(&["--kms", "aws"], &[], None));
    assert!(e.contains("--kms-key-id"), "{e}");
    let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let c = resolve(
        &["--kms", "aws", "--kms-endpoint", "http://127.0.0.1:5000"],
        &[("EAR_KMS_KEY_ID", arn)],
        Some("kms_region = \"eu-west-1\""),
    )
    .unwrap();
    assert_eq!(
        c.kms,
        Some(KmsConfig::Aws {
            key_id: arn.into(),
            endpoint: Some("http://127.0.0.1:5000".into()),
            region: Some("eu-west-1".into())
        })
    );
    // Key id with encryption off.
    let e = err_text(resolve(
        &["--encryption", "off", "--kms-key-id", arn],
        &[],
        None,
    ));
    assert!(e.contains("--kms-key-id") && e.contains("off"), "{e}");
    assert!(resolve(&["--encryption", "off", "--kms", "aws"], &[], None).is_err());
    // Key id with the local provider.
    let e = err_text(resolve(&[], &[("EAR_KMS_KEY_ID", arn)], None));
    assert!(
        e.contains("--kms-key-id") && e.contains("EAR_KMS_KEY_ID"),
        "{e}"
    );
    assert!(resolve(
        &[
            "--kms",
            "aws",
            "--kms-key-id",
            arn,
            "--local-kek-file",
            "/k"
        ],
        &[],
        None
    )
    .is_err());
    assert!(resolve(
        &[
            "--kms",
            "aws",
            "--kms-key-id",
            arn,
            "--kms-endpoint",
            "ftp://x"
        ],
        &[],
        None
    )
    .is_err());
    assert!(resolve(&["--kms", "aws", "--kms-key-id", " "], &[], None).is_err());
    // Encryption off: no provider at all.
    let c = resolve(&["--encryption", "off"], &[], None).unwrap();
    assert_eq!((c.encryption, c.kms), (Encryption::Off, None));
    assert!(resolve(&["--encryption", "off", "--integrity", "on"], &[], None).is_err());
    let c = resolve(&["--local-kek-file", "/k"], &[], None).unwrap();
    assert_eq!(
        c.kms,
        Some(KmsConfig::Local {
            kek_file: PathBuf::from("/k")
        })
    );
}

#[test]
fn other_subcommands() {
    let c = Cli::try_parse_from(["ear-sidecar", "status", "--data-dir", "/d", "--json"]).unwrap();
    match c.command {
        Command::Status(s) => {
            assert_eq!(s.data_dir, PathBuf::from("/d"));
            assert!(s.json);
        }
        other => panic!("{other:?}"),
    }
    let c = Cli::try_parse_from([
        "ear-sidecar",
        "validate-key",
        "--kms-key-id",
        "arn:aws:kms:us-east-1:111122223333:key/x",
        "--kms-region",
        "us-east-1",
    ])
    .unwrap();
    match c.command {
        Command::ValidateKey(v) => {
            assert_eq!(v.kms_startup_timeout, Duration::from_secs(60));
            assert!(
                matches!(v.kms_config().unwrap(), KmsConfig::Aws { region: Some(r), .. } if r == "us-east-1")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(Cli::try_parse_from(["ear-sidecar", "serve", "--bogus"]).is_err());
    assert!(Cli::try_parse_from(["ear-sidecar", "serve", "--encryption", "maybe"]).is_err());
}

#[test]
fn help_documents_env_and_defaults() {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    cmd.clone().debug_assert();
    let serve = cmd.find_subcommand_mut("serve").unwrap();
    let help = serve.render_long_help().to_string();
    for needle in [
        "EAR_DATA_DIR",
        "./ear-data",
        "EAR_EXPORT",
        "default=1G",
        "EAR_METRICS_ADDR",
        "127.0.0.1:9898",
        "EAR_KMS_REVOCATION_GRACE",
        "~/.config/ear-sidecar/local.kek",
        "--insecure-kek-in-data-dir",
    ] {
        assert!(help.contains(needle), "help lacks {needle}:\n{help}");
    }
}

#[test]
fn env_var_names() {
    assert_eq!(env_var_name("--data-dir"), "EAR_DATA_DIR");
    assert_eq!(
        env_var_name("--kms-revocation-grace"),
        "EAR_KMS_REVOCATION_GRACE"
    );
}

#[test]
fn a_misspelt_env_variable_is_refused_naming_the_closest() {
    let e = layers::check_env_names(["PATH", "EAR_DATA_DIR", "EAR_ALLOW_UIDS"].into_iter())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown environment variable EAR_ALLOW_UIDS"),
        "{e}"
    );
    assert!(e.contains("did you mean EAR_ALLOW_UID?"), "{e}");
    // Every option's variable, and the test suite's own, are accepted.
    let known = layers::known_env_names();
    assert!(known.iter().any(|k| k == "EAR_CONFIG"));
    assert!(known.iter().any(|k| k == "EAR_KMS_REVOCATION_GRACE"));
    layers::check_env_names(known.iter().map(String::as_str)).unwrap();
}

#[test]
fn negative_numbers_name_the_option_and_its_range() {
    for (argv, range) in [
        (["--max-connections", "-1"], "from 1 to 1048576"),
        (["--allow-uid", "-5"], "from 0 to 4294967294"),
        (["--key-cache-size", "-2"], "from 1 to 16777216"),
    ] {
        let mut full = vec!["ear-sidecar", "serve"];
        full.extend(argv);
        let e = Cli::try_parse_from(full).unwrap_err().to_string();
        assert!(e.contains(&format!("'-{}'", &argv[1][1..])), "{e}");
        assert!(e.contains(argv[0]), "{e}");
        assert!(e.contains(range), "{e}");
        assert!(!e.contains("unexpected argument"), "{e}");
    }
    let e = Cli::try_parse_from(["ear-sidecar", "serve", "--kms-revocation-grace", "-1s"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--kms-revocation-grace"), "{e}");
    assert!(!e.contains("unexpected argument"), "{e}");
}

#[test]
fn path_within_is_lexical_and_follows_existing_links() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    assert!(path_is_within(&data.join("local.kek"), &data));
    assert!(path_is_within(&data.join("x/../local.kek"), &data));
    assert!(!path_is_within(&d.path().join("kek/local.kek"), &data));
    assert!(!path_is_within(&data.join("../local.kek"), &data));
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::symlink(&data, d.path().join("alias")).unwrap();
    assert!(path_is_within(&d.path().join("alias/local.kek"), &data));
}

#[test]
fn admin_socket_defaults_beside_the_socket_and_empty_disables_it() {
    let c = resolve(&["--socket", "/run/ear/nbd.sock"], &[], None).unwrap();
    assert_eq!(
        c.admin_socket,
        Some(PathBuf::from("/run/ear/nbd.admin.sock"))
    );
    let c = resolve(&[], &[("EAR_ADMIN_SOCKET", "")], None).unwrap();
    assert_eq!(c.admin_socket, None);
    let c = resolve(&["--admin-socket", "/x/a.sock"], &[], None).unwrap();
    assert_eq!(c.admin_socket, Some(PathBuf::from("/x/a.sock")));
}
