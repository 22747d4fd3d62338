//! Signatures, attestations and OCI referrers travel with the image.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_attestations_and_referrers_travel_with_the_image() {
    common::init();
    let upstream = Registry::plain();
    let mirror = Registry::plain();
    let c = upstream.client();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], 64 * 1024);
    upstream.push("team/app", "1.0", &image).await;
    let index = (
        image.top.0.as_str(),
        image.top.1.len(),
        image.top.2.as_str(),
    );
    let arm = &image.manifests[1];
    let arm_subject = (arm.0.as_str(), arm.1.len(), arm.2.as_str());
    // cosign: a signature of the index, an attestation of one platform manifest.
    let sig = TestImage::artifact(
        index,
        "application/vnd.dev.cosign.artifact.sig.v1+json",
        false,
    );
    upstream
        .push("team/app", &schema_tag(&image.top.0, ".sig"), &sig)
        .await;
    let att = TestImage::artifact(arm_subject, "application/vnd.dsse.envelope.v1+json", false);
    upstream
        .push("team/app", &schema_tag(&arm.0, ".att"), &att)
        .await;
    // OCI 1.1: an SBOM with a subject; distribution 2.8 has no referrers API, so the index of
    // the tag schema lists it.
    let sbom_type = "application/spdx+json";
    let sbom = TestImage::artifact(index, sbom_type, true);
    upstream.push("team/app", &sbom.top.0, &sbom).await;
    let tag_index = TestImage::referrers_index(&[(&sbom, sbom_type)]);
    upstream
        .put_manifest(
            &c,
            "team/app",
            &schema_tag(&image.top.0, ""),
            &tag_index,
            common::OCI_INDEX,
        )
        .await;

    let registries = registries_for(&format!(
        "registries:\n  \"{}\": {{insecure: true}}\n  \"{}\": {{insecure: true}}\n",
        upstream.host(),
        mirror.host()
    ));
    let source = r(&format!("{}/team/app:1.0", upstream.host()));
    let target = r(&format!("{}/mirror/app:1.0", mirror.host()));
    let first = registries.copy(&source, &target, &[], None).await.unwrap();
    assert_eq!(first.referrers, 3, "{first:?}");
    // Every blob once: the artifacts share their empty config.
    let unique: std::collections::BTreeMap<&str, usize> = [&image, &sig, &att, &sbom]
        .iter()
        .flat_map(|a| a.blobs.iter().map(|(d, b)| (d.as_str(), b.len())))
        .collect();
    assert_eq!(first.bytes, unique.values().sum::<usize>() as u64);
    assert_same_image(&upstream, "team/app", &mirror, "mirror/app", "1.0");
    // Byte for byte, as an independent tool reads them.
    for reference in [
        schema_tag(&image.top.0, ".sig"),
        schema_tag(&arm.0, ".att"),
        sbom.top.0.clone(),
        schema_tag(&image.top.0, ""),
    ] {
        let (from, to) = (
            upstream.skopeo_raw("team/app", &reference),
            mirror.skopeo_raw("mirror/app", &reference),
        );
        assert!(from.is_some(), "upstream has {reference}");
        assert_eq!(from, to, "{reference} differs");
    }
    for artifact in [&sig, &att, &sbom] {
        for (digest, _) in &artifact.blobs {
            assert!(mirror.has_blob("mirror/app", digest).await, "{digest}");
        }
    }

    // Again: nothing moves.
    let second = registries.copy(&source, &target, &[], None).await.unwrap();
    assert_eq!((second.referrers, second.bytes), (0, 0), "{second:?}");

    // A referrer made since: it comes along, and the mirror's tag-schema index lists both.
    let vex_type = "application/vnd.openvex+json";
    let vex = TestImage::artifact(index, vex_type, true);
    upstream.push("team/app", &vex.top.0, &vex).await;
    let tag_index = TestImage::referrers_index(&[(&sbom, sbom_type), (&vex, vex_type)]);
    upstream
        .put_manifest(
            &c,
            "team/app",
            &schema_tag(&image.top.0, ""),
            &tag_index,
            common::OCI_INDEX,
        )
        .await;
    let third = registries.copy(&source, &target, &[], None).await.unwrap();
    assert_eq!(third.referrers, 1, "{third:?}");
    assert_eq!(
        mirror.skopeo_raw("mirror/app", &vex.top.0),
        Some(vex.top.1.clone())
    );
    let listed: Value = serde_json::from_slice(
        &mirror
            .skopeo_raw("mirror/app", &schema_tag(&image.top.0, ""))
            .unwrap(),
    )
    .unwrap();
    let digests: Vec<&str> = listed["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [sbom.top.0.as_str(), vex.top.0.as_str()]);
    assert_eq!(listed["manifests"][1]["artifactType"], vex_type);

    // One platform: the rebuilt index has nothing signed, the platform's attestation comes.
    let only_arm = r(&format!("{}/arm/app:1.0", mirror.host()));
    let platform = [Platform::parse("linux/arm64").unwrap()];
    let filtered = registries
        .copy(&source, &only_arm, &platform, None)
        .await
        .unwrap();
    assert_eq!(filtered.referrers, 1, "{filtered:?}");
    assert!(mirror
        .skopeo_raw("arm/app", &schema_tag(&arm.0, ".att"))
        .is_some());
    assert!(mirror
        .skopeo_raw("arm/app", &schema_tag(&image.top.0, ".sig"))
        .is_none());

    // Turned off: the image only.
    let bare = r(&format!("{}/bare/app:1.0", mirror.host()));
    let off = registries
        .copy_with(&source, &bare, &[], None, false)
        .await
        .unwrap();
    assert_eq!((off.referrers, off.bytes), (0, image.total_bytes()));
    assert!(mirror
        .skopeo_raw("bare/app", &schema_tag(&image.top.0, ".sig"))
        .is_none());
    assert!(mirror.skopeo_raw("bare/app", &sbom.top.0).is_none());
}
