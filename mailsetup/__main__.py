from mailsetup.cli import main

main()
