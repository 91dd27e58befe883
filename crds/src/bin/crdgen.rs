//! Writes `charts/portcullis/crds/*.yaml` from the Rust types.

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/portcullis/crds");
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in portcullis_crds::crdgen::crd_files() {
        std::fs::write(dir.join(&file), yaml)?;
        println!("wrote charts/portcullis/crds/{file}");
    }
    Ok(())
}
