//! What an operator meets when running nodes by hand: a data directory used twice, an
//! admitted node that lost its identity key.

use std::time::Duration;

use pdsno_tests::{Lab, run};

fn pdsno(args: &[&str]) -> (Option<i32>, String, String) {
    run(
        &pdsno_tests::pdsno_bin().display().to_string(),
        args,
        Duration::from_secs(60),
    )
}

#[test]
fn a_data_dir_serves_one_node_and_a_lost_identity_key_is_never_replaced() {
    let lab = Lab::new();
    let mut gc = lab.global(&[]);
    let data = gc.data_dir.display().to_string();
    let secret = lab.secret_file.display().to_string();
    let second = [
        "global",
        "--data-dir",
        &data,
        "--bootstrap-secret-file",
        &secret,
        "--listen-grpc",
        "127.0.0.1:0",
        "--listen-rest",
        "127.0.0.1:0",
        "--listen-mqtt",
        "127.0.0.1:0",
    ];
    let (code, out, err) = pdsno(&second);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "in use by another pdsno process (pid {})",
            gc.proc.pid()
        )),
        "{err}"
    );
    // The running node was not disturbed.
    assert!(gc.proc.is_alive());
    gc.proc.terminate(Duration::from_secs(10));

    // Stopped, the directory is free again; without its key the node refuses to start
    // rather than become someone else.
    std::fs::remove_file(gc.data_dir.join("identity.key")).expect("remove key");
    let (code, out, err) = pdsno(&second);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("identity key of global_cntl_1 is missing") && err.contains("backup"),
        "{err}"
    );
    assert!(
        !gc.data_dir.join("identity.key").exists(),
        "a new key was created"
    );
}
