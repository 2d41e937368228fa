#[test]
fn scratch() {
    whereabouts::cli::crds::run(whereabouts::cli::crds::CrdsArgs {
        output_dirs: vec![
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy")),
            std::path::PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/helm/whereabouts/crds"
            )),
        ],
    })
    .unwrap();
}
