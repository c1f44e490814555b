// Notebook figures fit the column; a click shows one at its full size (scrolling sideways if it
// is wider than the column), a second click fits it again, as in JupyterLab.
document$.subscribe(() => {
  for (const img of document.querySelectorAll(".jp-RenderedImage img")) {
    img.title = "Click to toggle full size";
    img.addEventListener("click", () => img.classList.toggle("jp-mod-unconfined"));
  }
});
