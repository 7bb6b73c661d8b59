fn main() {
    let crds = herald::crd::render_yaml().expect("crds");
    print!("{crds}");
}
