//! Compiles every `.proto` file under `omnibus/` and writes the encoded file descriptor set
//! that the servers hand to gRPC reflection.

use std::path::{Path, PathBuf};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages; PROTOC still wins if set.
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut protos = Vec::new();
    collect_protos(&root.join("omnibus"), &mut protos)?;
    protos.sort();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // RPCs without an implementation answer UNIMPLEMENTED instead of failing the build.
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("omnibus_descriptor.bin"))
        .compile_protos(&protos, &[root])?;
    println!("cargo:rerun-if-changed=omnibus");
    Ok(())
}
