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
        Err(errs) => {
            for e in &errs {
                eprintln!("configuration error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let res = rt.block_on(async {
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("metrics listener {a}: {e}"))?,
            ),
            None => None,
        };
        vpn_shoot_client::run(cfg, metrics, async {
            let sig = common::io::signal::terminate().await;
            tracing::info!(signal = sig, "received signal");
        })
        .await
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "vpn-shoot-client failed");
            ExitCode::from(1)
        }
    }
}
