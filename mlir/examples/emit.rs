//! Prints the MLIR module of every kernel group of the first function of a `.cir` file:
//! `cargo run -p cleave-mlir --example emit -- FILE.cir`.

fn main() {
    let path = std::env::args().nth(1).expect("usage: emit FILE.cir");
    let text = std::fs::read_to_string(&path).expect("read the file");
    let module = cleave_ir::parse_module(&text).expect("parse");
    let kernels = cleave_mlir::emit_function(&module.functions[0]).expect("emit");
    let funcs: Vec<&str> = kernels.iter().map(|k| k.func.as_str()).collect();
    print!("{}", cleave_mlir::module_text(&funcs));
}
