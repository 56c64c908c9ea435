from mailsetup.entry import main

main()
