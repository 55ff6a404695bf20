"""Image folders as torchvision's `ImageFolder` reads them: one folder per class (files in
folders nested inside a class folder belong to it), class indices in sorted name order,
image extensions in any case, other files ignored. Either one root of class folders, or one
root per split (`train/`, `val/`, `test/`: ImageNet, Imagenette, most Kaggle sets), each
holding the class folders. Hidden files and folders are skipped, as `datasets` does."""

from __future__ import annotations

import posixpath
import warnings

from pipeline.kinds.files import FilesKind, check_split_classes
from pipeline.kinds.hf_imagefolder import has_metadata
from pipeline.sources import SPLIT_ALIASES, Listing, Source, SourceError, hidden, split_keyword

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(FilesKind):
    name = "folder"
    layout = "an image folder (torchvision ImageFolder)"

    def claims(self, listing: Listing) -> list[str]:
        if has_metadata(listing):
            return []
        return [f for f in listing.files if f.lower().endswith(IMAGE_SUFFIXES)]

    def resolve(self, listing: Listing, files: list[str]) -> Source:
        parts = {f: listing.rel(f).split("/") for f in files}
        in_folders = [f for f in files if len(parts[f]) > 1]
        if not in_folders:  # unlabelled: `vitray predict` reads them; training needs classes
            return Source(
                self.name,
                listing.root,
                listing.filesystem,
                None,
                files,
                {"train": files},
                spec=listing.spec,
            )
        tops = sorted({parts[f][0] for f in in_folders})
        hidden_images = [
            f
            for f in listing.hidden_files
            if "/" in f and not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
        ]  # in class folders (a hidden folder at the root is no class here)
        if hidden_images:
            warnings.warn(
                f"{listing.spec}: {len(hidden_images)} hidden images are skipped, as `datasets` "
                f"skips them (torchvision's ImageFolder reads them): {hidden_images[:3]}",
                stacklevel=2,
            )
        lookalikes = [t for t in tops if t.lower() in SPLIT_ALIASES and t not in SPLIT_ALIASES]
        if lookalikes:
            raise SourceError(
                f"{listing.spec} could be read two ways: {lookalikes} name splits in another "
                "case, classes to torchvision and neither to `datasets`; rename them train, "
                "val (or validation) and test, or give the classes other names"
            )
        empty = [d for d in listing.folders if not d.startswith(".") and d not in tops]
        if empty:
            raise no_images_in(listing, empty)
        split_tops = [t for t in tops if t in SPLIT_ALIASES]
        if split_tops and len(split_tops) < len(tops):
            others = [t for t in tops if t not in split_tops]
            raise SourceError(
                f"{listing.spec} could be read two ways: {split_tops} are split names and "
                f"{others[:6]} are not, so they are either all classes or a mix of splits "
                "and classes; keep one root per split, each holding only class folders, or "
                "one root of class folders"
            )
        if not split_tops:  # one root of class folders
            refuse_split_lookalikes(listing, tops, [parts[f] for f in in_folders])
            classes = tops
            labels = {f: classes.index(parts[f][0]) for f in in_folders}
            return Source(
                self.name,
                listing.root,
                listing.filesystem,
                classes,
                in_folders,
                {"train": in_folders},
                spec=listing.spec,
                file_labels=labels,
            )
        return self.split_roots(listing, in_folders, parts, split_tops)

    def split_roots(
        self, listing: Listing, files: list[str], parts: dict[str, list[str]], tops: list[str]
    ) -> Source:
        """`train/<class>/...`, `val/<class>/...`: classes from train, in sorted order."""
        split_of = {top: SPLIT_ALIASES[top] for top in tops}
        twice = sorted({s for s in split_of.values() if list(split_of.values()).count(s) > 1})
        if twice:
            same = [top for top in tops if split_of[top] in twice]
            raise SourceError(
                f"{listing.spec} could be read two ways: folders {same} all name split "
                f"{twice[0]!r}; keep one of them"
            )
        loose = [listing.rel(f) for f in files if len(parts[f]) < 3]
        if loose:
            raise SourceError(
                f"{listing.spec} has split folders {tops}, but {loose[:4]} sit in a split "
                "folder, not in a class folder inside it: put every image in "
                "<split>/<class>/"
            )
        splits: dict[str, list[str]] = {}
        names: dict[str, set[str]] = {}
        for f in files:
            split = split_of[parts[f][0]]
            splits.setdefault(split, []).append(f)
            names.setdefault(split, set()).add(parts[f][1])
        with_images = {"/".join(parts[f][:2]) for f in files}
        empty = [
            d
            for d in listing.subfolders
            if d.split("/")[0] in split_of and not hidden(d) and d not in with_images
        ]
        if empty:
            raise no_images_in(listing, empty)
        check_split_classes(listing.spec, self.layout, names)
        classes = sorted(names.get("train") or set().union(*names.values()))
        index = {name: i for i, name in enumerate(classes)}
        labels = {f: index[parts[f][1]] for f in files}
        return Source(
            self.name,
            listing.root,
            listing.filesystem,
            classes,
            files,
            splits,
            spec=listing.spec,
            file_labels=labels,
        )


def refuse_split_lookalikes(listing: Listing, tops: list[str], paths: list[list[str]]) -> None:
    """A root whose folders `datasets` reads as splits and torchvision as classes is refused:
    folders named for splits in a longer name (`train_set`, `val2017`), or folders that
    each hold split folders (`imagenette2-160/train/...`)."""
    named = {top: split_keyword(top) for top in tops}
    if all(named.values()):
        raise SourceError(
            f"{listing.spec} could be read two ways: its folders name splits to `datasets` "
            f"({named}) and classes to torchvision; rename them train, val (or "
            "validation) and test, or give the classes other names"
        )
    if all(len(parts) > 2 and split_keyword(parts[1]) for parts in paths):
        raise SourceError(
            f"{listing.spec}: its folders {tops[:6]} each hold split folders "
            f"({'/'.join(paths[0][:2])}/...): torchvision would take {tops[:2]} for classes "
            f"and `datasets` would merge their splits; point data.dataset at one of them, "
            f"e.g. {posixpath.join(listing.spec, tops[0])}"
        )


def no_images_in(listing: Listing, empty: list[str]) -> SourceError:
    """Class folders without an image: torchvision's ImageFolder stops on them."""
    return SourceError(
        f"{listing.spec}: folders {empty[:6]} hold no image vitray reads (hidden files are "
        "skipped); torchvision's ImageFolder would take each for a class and stop on it: "
        "remove them"
    )
