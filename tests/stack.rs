//! The stack is a small real cloud (issue 10): Nova builds servers from the stack's guest
//! image and they boot to their guest agent; Nova's own nova-compute snapshots a server with
//! its own RBD direct path — the anchor novasnap is measured against —; and the guest's
//! records can be checked in any image of its disk.

mod common;

use std::time::{Duration, Instant};

use common::openstack::*;
use common::*;

/// Nova's own snapshot path on the same stack, with no novasnap running: the image is
/// active, Nova made it the direct way (a clone of the disk in Glance's pool), and the
/// guest's records in it form an unbroken prefix.
#[tokio::test]
async fn nova_compute_snapshots_a_server_itself_when_no_novasnap_runs() {
    let server = server(1);
    server.wait_idle(Duration::from_secs(60)).await;
    let started = Instant::now();
    let image_id = server.image_create(&unique("test-nova-anchor")).await;
    let took = started.elapsed();
    let image = image_show(&image_id).await;
    assert_eq!(image["status"], "active", "{image:#}");
    assert_eq!(image["disk_format"], "raw");
    let request = server.last_request("createImage").await;
    let action = server.action(&request).await;
    let events: Vec<_> = action["events"].as_array().unwrap().iter().map(|e| e["event"].clone()).collect();
    assert!(events.contains(&"compute_snapshot_instance".into()), "{action:#}");
    assert!(stack_log("nova-compute").contains(&request), "served by the stack's nova-compute");
    let check = check_image(&format!("rbd:images/{image_id}"), false).await;
    assert_eq!(check.status, 0, "{}", check.output);
    assert!(check.unbroken() && check.last_record() > 0, "{}", check.output);
    server.wait_idle(Duration::from_secs(60)).await;
    eprintln!("nova-compute's own snapshot of a {} disk: {took:.1?}", env("SERVER1_DISK"));
    image_delete(&image_id).await;
}

/// A server made by Nova as a user makes one (`openstack server create --wait`, no network)
/// boots the stack's image to its guest agent (within 120 s of ACTIVE: `create_server`).
#[tokio::test]
async fn a_server_nova_creates_boots_and_its_agent_answers() {
    let image = env("SERVER1_IMAGE");
    let started = Instant::now();
    let server = create_server(&image).await;
    eprintln!("created and its agent answering in {:.1?}", started.elapsed());
    let disk = rbd_json(&["info", rbd_name(&server.disk)]).await;
    drop(server);
    assert!(disk["parent"]["image"].as_str() == Some(image.as_str()), "Nova cloned the raw image: {disk:#}");
}

/// The guest writes all the time; a point-in-time RBD snapshot of its disk holds an unbroken
/// prefix of its records, and the checker tells a broken image from a good one.
#[tokio::test]
async fn the_checker_reads_the_records_of_a_writing_guest() {
    let server = server(2);
    let disk = rbd_name(&server.disk).to_string();
    let snap = unique("test-check");
    let first = rbd_snap(&disk, &snap).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = rbd_snap(&disk, &format!("{snap}-later")).await;
    for s in [&snap, &format!("{snap}-later")] {
        let _ = tokio::process::Command::new("rbd").args(["snap", "rm", &format!("{disk}@{s}")]).output().await;
    }
    for check in [&first, &second] {
        assert_eq!(check.status, 0, "{}", check.output);
        assert!(check.unbroken(), "{}", check.output);
    }
    assert!(
        second.last_record() > first.last_record(),
        "the guest kept writing: {} then {}",
        first.output,
        second.output
    );
}

async fn rbd_snap(disk: &str, snap: &str) -> Check {
    let out =
        tokio::process::Command::new("rbd").args(["snap", "create", &format!("{disk}@{snap}")]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check_image(&format!("rbd:{disk}@{snap}"), false).await
}
