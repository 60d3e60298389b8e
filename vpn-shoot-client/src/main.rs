use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use vpn_shoot_client::config::{Cli, Command};

fn keys(cmd: Command) -> ExitCode {
    match cmd {
        Command::Keygen => {
            println!("{}", common::keys::generate_private_key());
            ExitCode::SUCCESS
        }
        Command::Pubkey => {
            let mut input = String::new();
            if let Err(e) = std::io::stdin().take(4096).read_to_string(&mut input) {
                eprintln!("cannot read the private key from stdin: {e}");
                return ExitCode::from(1);
            }
            match common::keys::public_key_of(input.trim()) {
                Ok(p) => {
                    println!("{p}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(cmd) = cli.command {
        return keys(cmd);
    }
    common::io::log::init(&cli.args.log_format);
    let cfg = match cli.args.validate() {
        Ok(c) => c,
        Err(errs) => return common::io::process::config_errors(&errs),
    };
    common::io::process::run("vpn-shoot-client", |shutdown| async move {
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("metrics listener {a}: {e}"))?,
            ),
            None => None,
        };
        vpn_shoot_client::run(cfg, metrics, shutdown).await
    })
}
