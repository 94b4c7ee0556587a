//! Generates the prost messages and tonic stubs from `pigeonhole/**.proto`.
//! Needs `protoc` (Debian: protobuf-compiler), installed by scripts/setup.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let public = ["pigeonhole/v1/mailbox.proto", "pigeonhole/v1/admin.proto"];
    let internal = [
        "pigeonhole/internal/v1/command.proto",
        "pigeonhole/internal/v1/raft.proto",
        "pigeonhole/internal/v1/meta.proto",
    ];
    for p in public.iter().chain(&internal) {
        println!("cargo:rerun-if-changed={p}");
    }
    // The public API's descriptor set feeds server reflection, so grpcurl
    // and friends can call a node without the .proto files. The internal
    // protocol is compiled apart and left out of it.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("pigeonhole_v1_descriptor.bin"))
        // A request the server cannot decode is INVALID_ARGUMENT, not
        // tonic's INTERNAL (src/codec.rs).
        .codec_path("crate::codec::ApiCodec")
        // Payloads travel as `bytes::Bytes`: decoded as slices of the
        // request's buffer, handed to the internal command without a copy,
        // and read pages built from the engine's buffers without one
        // (issue 12, deliverable 4).
        .bytes(".pigeonhole.v1.AppendRequest.payload")
        .bytes(".pigeonhole.v1.Message.payload")
        .compile_protos(&public, &["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // An append's payload is decoded as a slice of the Raft entry that
        // carries it, not copied out (issue 12, deliverable 4).
        .bytes(".pigeonhole.internal.v1.AppendOp.payload")
        .compile_protos(&internal, &["."])?;
    Ok(())
}
