fn main() {
    // The grammar is compiled to Rust at build time; the generated parser lives in OUT_DIR.
    lalrpop::Configuration::new()
        .use_cargo_dir_conventions()
        .emit_rerun_directives(true)
        .process()
        .expect("the .moe grammar must compile");
}
